"""The modules of the original toolkit, as round stages (see ``spfl_vmap.stages``).

Each module owns its config section (a validator registered with
:func:`spfl_vmap.config.register_section`) and a ``stages(cfg, env)`` function returning its
stages for a run. ``spfl_vmap.builder`` is the one place that knows every module and assembles
them; the round loop sees only the stage protocols.

* :mod:`.byzantine`: malicious clients, attacks on ``U``, label poisoning, robust aggregation.
* :mod:`.backdoor`: trigger poisoning (BadNets, DBA), model-replacement boost, attack success
  rate, clip-and-noise defenses.
* :mod:`.crfl`: CRFL's global-model clip and noise (certified with ``spfl certify``).
* :mod:`.privacy`: DP-SGD (example level), DP-FedAvg (user level), local DP, accounting.
"""
