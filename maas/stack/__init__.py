"""Local stacks: etcd and nats-server processes, and `maas up`'s process supervisor."""
