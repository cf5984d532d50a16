"""peftserve replicas on Ray Serve: an ingress and N engine replicas, requests routed by adapter id.

Needs the optional extra ``peftserve[ray]``. cluster runs it (`peftserve cluster`, cli); ingress and
remote are the front (the gRPC servicers and the HTTP app over a handle of the replicas), replica the
engine side; routing, store_sync and config are plain Python; directory and federation hold what spans
replicas.
"""
