/*
 * Guest-side PCI (configuration access by ECAM and 0xCF8/0xCFC, enumeration of bus 0, BARs, capabilities,
 * MSI-X), virtio over PCI (virtio 1.2, 4.1) and an Intel VT-d driver (legacy translation mode), written
 * from the PCI Local Bus 3.0 / PCI Express Base 4.0, virtio 1.2 and Intel VT-d specifications.
 */
#ifndef KVMLET_GUEST_PCI_H
#define KVMLET_GUEST_PCI_H

#include "virtio.h"

/* Configuration space (pci.c) */
#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND   0x04
#define PCI_STATUS    0x06
#define PCI_CLASS_REV 0x08
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0      0x10
#define PCI_CAP_PTR   0x34
#define PCI_INT_LINE  0x3c
#define PCI_CMD_MEMORY 0x2
#define PCI_CMD_MASTER 0x4
#define PCI_CMD_INTX_DISABLE 0x400
#define PCI_STATUS_CAPS 0x10
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX   0x11
#define PCI_BDF(bus, dev, fn) ((uint16_t)((bus) << 8 | (dev) << 3 | (fn)))

bool pci_init(void);                    /* finds ECAM (MCFG, or kvmlet.pci_ecam=); false: only 0xCF8 */
uint64_t pci_ecam_base(void);
uint32_t pci_read(uint16_t bdf, unsigned off, unsigned size);  /* ECAM if found, else 0xCF8/0xCFC */
void pci_write(uint16_t bdf, unsigned off, unsigned size, uint32_t v);
uint32_t pci_legacy_read32(uint16_t bdf, unsigned off);        /* always through 0xCF8/0xCFC */
uint64_t pci_bar(uint16_t bdf, unsigned index, bool *is64);    /* memory BAR address */
unsigned pci_find_cap(uint16_t bdf, uint8_t id, unsigned after); /* 0 if none */
unsigned pci_list(uint16_t *out, unsigned max);                /* functions on bus 0 */

/* MSI (pci.c): vectors VEC_MSI0 .. VEC_MSI0 + 15 count their interrupts */
extern volatile uint32_t msi_count[16];
void msi_dispatch(unsigned index);
bool msi_wait(unsigned index, uint32_t target, uint64_t max_tsc); /* CPL0: sti; hlt until count >= target */

/* virtio over PCI (virtio_pci.c) */
unsigned vpci_discover(struct virtio_dev *out, unsigned max);
const char *vpci_begin(struct virtio_dev *d, uint64_t wanted);
const char *vpci_program_queue(struct virtio_dev *d, struct virtq *q, bool interrupts, uint16_t *size);
uint16_t vpci_queue_max(struct virtio_dev *d, unsigned index);
void vpci_driver_ok(struct virtio_dev *d);
void vpci_reset(struct virtio_dev *d);
uint32_t vpci_status(struct virtio_dev *d);
void vpci_set_status(struct virtio_dev *d, uint32_t status);
uint32_t vpci_cfg(struct virtio_dev *d, unsigned off, unsigned size);
uint32_t vpci_generation(struct virtio_dev *d);
const char *vpci_msix_enable(struct virtio_dev *d, unsigned first_vector, unsigned count); /* entry i -> vector */
void vpci_msix_mask(struct virtio_dev *d, unsigned entry, bool masked);
bool vpci_msix_pending(struct virtio_dev *d, unsigned entry);

/* VT-d (vtd.c) */
bool vtd_present(void);
uint64_t vtd_base(void);

#endif
