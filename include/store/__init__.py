"""The artifact store: content-addressed stage outputs with manifests, hashing, file placement, scratch names and
their sweep, in-use marks, and the retention that collects what no kept version needs."""
