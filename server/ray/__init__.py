"""loraswap on Ray Serve (the optional ``loraswap[ray]`` extra): engine replicas behind an ingress.

:mod:`~loraswap.server.ray.app` builds the application (``serve run loraswap.server.ray.app:build_app``,
or a KubeRay ``RayService``); :mod:`~loraswap.server.ray.deployment` is the replica, one loraswap engine
each, whose adapters are Ray Serve multiplexed models keyed by digest; :mod:`~loraswap.server.ray.ingress`
is the ``loraswap.v1.Inference`` service behind Ray Serve's gRPC proxy, resolving tags against the shared
registry. Nothing here imports ``ray`` at module level: the modules import without the extra.
"""
