"""Framework integrations (optional extras): `aiopg_resilient.integrations.fastapi`
(extra ``fastapi``) and `aiopg_resilient.integrations.aiohttp` (extra ``aiohttp``). Each
imports its framework only when imported itself."""
