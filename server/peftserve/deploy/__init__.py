"""peftserve replicas on Ray Serve: one ingress, N engine replicas, requests routed by adapter id.

Needs the optional extra ``peftserve[ray]``. Modules that import ray: ingress, replica, directory,
cluster; routing, store_sync and config are plain Python.
"""
