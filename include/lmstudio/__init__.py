"""LM Studio: the versioned models tree, the deployments ledger, install/promote/rollback, ``lms``."""
