"""An emulated Intel VT-d DMA-remapping unit and the per-device DMA address spaces behind it.

Modules: ``regs`` (the specification's numbers), ``walk`` (root, context and second-level tables), ``vtd`` (the
unit: registers, caches, faults), ``invalidation`` (queued invalidation), ``dma`` (a device's view of guest
memory through the unit). See docs/vtd.md.
"""
