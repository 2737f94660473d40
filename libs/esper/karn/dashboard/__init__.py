"""The web dashboard: a live page of runs (accuracy curves, the seed lifecycle, seeds, PPO policy
health, alerts) fed over a WebSocket from telemetry events.

`state` folds events into what the page shows, `guard` decides who may ask, `server` serves (aiohttp),
`launch` starts it from the command line. Nothing is imported here: the command line reads the flags
of `launch` without loading the web server.
"""
