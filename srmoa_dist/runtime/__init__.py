"""The Ray layer: store actors (shards, key store, trainer), the client that hides Ray, bootstrap.

    bootstrap.connect(cfg)      start or join Ray; get or create the named actors of one store
    client.ExpertStoreClient    batch get/put over the shard actors, LRU cache invalidated by version
    shard_actor.ShardActor      one LMDB shard per actor (raw expert records)
    keystore_actor.KeyStoreActor routing keys: batched search, background consolidation, snapshots
    trainer_actor.TrainerActor  SR-TTT feedback jobs from a queue
"""
