"""The commands users run to make and check data (`gq scenes`, `gq import-meshes`, `gq shards ...`) and `gq` itself."""
