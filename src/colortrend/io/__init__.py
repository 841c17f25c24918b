"""Reading photos in and writing tables out: discovery, decoding, atomic shards, the run lock."""
