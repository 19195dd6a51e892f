"""The composer: train -> rerank -> report -> mirror for the CLI and the flows alike
(`training`), plus what orchestrators need around it: parameters -> config (`params`) and stage
cache keys (`stage_cache`)."""
