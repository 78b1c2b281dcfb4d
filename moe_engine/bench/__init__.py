"""Benchmarks and tuners (`moe-engine bench ...`): they import the runtime, never the other way round."""
