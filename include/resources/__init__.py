"""The worker's resources as the stages see them: memory (MemAvailable, the cgroup's limit, a configured budget),
the anonymous memory a process tree holds, the kernel's OOM-kill counters, the record each heavy stage leaves while
it runs (so the next try knows how the previous one ended), and the guard that joins them around a stage."""
