"""Methods built on the routing core, one file each."""
