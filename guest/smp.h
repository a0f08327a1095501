/* MP table results and AP start-up. */
#ifndef KVMLET_GUEST_SMP_H
#define KVMLET_GUEST_SMP_H

#include <stdint.h>

#define MP_MAX_CPUS 64

struct mp_info {
    uint64_t fp_addr;    /* MP floating pointer structure */
    uint64_t cfg_addr;   /* MP configuration table */
    uint64_t lapic_addr; /* from the configuration table */
    unsigned ncpus;      /* enabled processor entries */
    uint8_t apic_ids[MP_MAX_CPUS];
    const char *error;   /* NULL when the table was read */
};

uint64_t user_mp_find(uint64_t arg); /* struct mp_info *, runs at CPL3 */

#endif
