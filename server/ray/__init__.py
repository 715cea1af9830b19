"""loraswap on Ray Serve (the optional ``loraswap[ray]`` extra): engine replicas behind an ingress.

:mod:`~loraswap.server.ray.app` builds the application (``serve run loraswap.server.ray.app:build_app``,
or a KubeRay ``RayService``); :mod:`~loraswap.server.ray.deployment` is the replica, one loraswap engine
each, whose adapters are Ray Serve multiplexed models keyed by digest; :mod:`~loraswap.server.ray.ingress`
is the ``loraswap.v1.Inference`` and ``loraswap.v1.Admin`` services behind Ray Serve's gRPC proxy (and the
OpenAI API behind its HTTP proxy), resolving tags against the shared registry, checking tokens and
deadlines (:mod:`~loraswap.server.ray.calls`, fed by :mod:`~loraswap.server.ray.grpc_proxy` in the proxy)
and administering the replicas (:mod:`~loraswap.server.ray.admin`). Nothing here imports ``ray`` at module
level: the modules import without the extra.
"""
