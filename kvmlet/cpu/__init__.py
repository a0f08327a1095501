"""vCPU set-up and CPU models.

setup (registers, CPUID, MSRs of each vCPU), cpuid (per-vCPU topology), msrs (boot MSRs), state (save and
restore), features (named CPUID/MSR features), models/ (the catalog and model files), plan (a VM's CPU,
checked against this host), template (Firecracker's custom templates), xsave (leaf 0xD, AMX permission),
capture (a host's CPU as JSON), baseline and compat (libvirt's cpu-baseline / cpu-compare, the migration
gate), cli (``kvmlet cpu``). docs/cpu-models.md describes them.
"""
