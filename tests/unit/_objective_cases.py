"""Shared hyper-parameters for the objective and metric tests (one valid setting per objective)."""

HP = {
    "bypass_token": dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "bypass_seq": dict(eps_low=0.5, eps_high=3.0, dual_clip=10.0),
    "bypass_geo": dict(eps_low=3e-4, eps_high=4e-4, dual_clip=100.0),
    "ppo": dict(eps_low=0.2, eps_high=0.28, dual_clip=10.0),
    "mis_token": dict(eps_low=0.2, eps_high=0.28, is_low=0.0, is_high=3.0),
    "mis_seq": dict(eps_low=0.2, eps_high=0.28, is_low=0.0, is_high=5.0, veto=1e-4),
    "mis_seq_geo": dict(eps_low=3e-4, eps_high=4e-4, is_low=0.0, is_high=5.0, dual_clip=100.0),
    "tis_token": dict(eps_low=0.2, eps_high=0.28, is_high=2.0),
    "tis_seq": dict(eps_low=0.2, eps_high=0.28, is_high=5.0),
    "dppo_tv": dict(delta=0.15),
    "dppo_kl": dict(delta=0.05),
    "drpo": dict(delta=12.5),
    "spo": dict(delta=0.2),
    "drpo_mask": dict(delta=12.5, dppo_delta=0.15),
}
