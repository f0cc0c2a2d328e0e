"""The names a sharded (DCP) checkpoint uses on disk and in its manifest (a leaf module)."""

STORAGE = "dcp"  # the manifest's "storage" of an object that lives in the .distcp shards
METADATA_FILE = ".metadata"  # DCP's index of the shards
SHARD_SUFFIX = ".distcp"  # DCP's shard files, __<rank>_0.distcp
