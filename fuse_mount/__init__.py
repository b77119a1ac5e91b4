"""FUSE front end: each logical volume of a mounted pool appears as one regular file."""
