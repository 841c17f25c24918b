"""Colour maths of the pipeline: conversions and CIEDE2000 (``space``), white balance (``white_balance``), batched
garment k-means (``kmeans``) and the named garment palette (``names``). Plain numpy, no torch."""
