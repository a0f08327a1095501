"""The vTPM: swtpm supervised per VM, measured launch, the TCG event log, the launch policy and attestation.

docs/tpm.md describes the PCR map, the event log, the policy format and how to verify a VM from outside.
The guest-facing front end (the TPM TIS interface) is :mod:`kvmlet.devices.tpm_tis`. Nothing here is imported
for a VM without a vTPM.
"""
