"""The mesh runtime every service is built on.

- config:    frozen, validated configuration from flags and environment
- logs:      logging with a request id on every line, JSON behind a flag
- errors:    the domain exception hierarchy and its gRPC status codes
- etcd:      one etcd session (lease, keepalive, re-registration) per process
- keys:      the etcd key layout shared by all services
- discovery: get-then-watch mirrors of etcd prefixes
- events:    JetStream lifecycle events and core-NATS load telemetry
- server:    the gRPC server bootstrap (health, reflection, error interceptor,
             metrics endpoint, graceful shutdown)
- clients:   finding and dialling services through etcd; the registry client
- artifacts: the artifact format (deterministic tar named by its sha256)
- names:     the naming rule for models, deployments and aliases
- aio:       cancellation-safe waits (asyncio.wait_for loses cancellations on 3.11)
"""
