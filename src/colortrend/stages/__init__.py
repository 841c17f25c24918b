"""One module per pipeline stage; ``base.py`` holds the contract they share."""
