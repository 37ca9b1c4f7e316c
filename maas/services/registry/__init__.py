"""registry: models, versions, aliases (later: adapters, artifacts, tenants). Metadata in etcd."""
