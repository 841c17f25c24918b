"""Where photos and tables live (local paths or fsspec URLs): input discovery, atomic shards, the run lock."""
