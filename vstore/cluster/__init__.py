"""Running a pool across hosts: the etcd client and the ownership lease with its write fence."""
