"""vstore: a storage virtualization engine (RAID, multipath, journal, FUSE) in Python."""

__version__ = "0.1.0"
