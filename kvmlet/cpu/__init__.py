"""vCPU set-up: registers, CPUID and MSRs a guest starts with (CPU models come here too)."""
