"""Rollout side of megatron-alp: engines, the checkpoint bus, generation, rewards.

This package never imports ``megatron_alp`` (one-way dependency).
"""
