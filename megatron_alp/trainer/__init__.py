"""The trainer's parts: setup, actor, batching, optimizer, checkpoint, rollout driver, step metrics, monitor."""
