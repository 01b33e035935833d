/* The lane's cluster lookup for logical volumes: bt_lvol.h says what the map holds and
 * the rules of its use. seq_cst on `frozen` and `busy` makes the freeze a Dekker pair:
 * the lane counts itself busy, then looks at frozen; Python sets frozen, then looks at
 * busy; one of the two always sees the other. */
#include <stdint.h>

#include "bt_lvol.h"

void bt_lvmap_set(struct bt_lvmap *m, uint64_t vc, uint64_t entry)
{
    if (vc < m->nclusters)
        __atomic_store_n(&m->map[vc], entry, __ATOMIC_RELEASE);
}

void bt_lvmap_freeze(struct bt_lvmap *m, int on)
{
    __atomic_store_n(&m->frozen, on ? 1u : 0u, __ATOMIC_SEQ_CST);
}

uint32_t bt_lvmap_busy(const struct bt_lvmap *m)
{
    return __atomic_load_n(&m->busy, __ATOMIC_SEQ_CST);
}

int lane_lv_enter(struct bt_lvmap *m)
{
    __atomic_fetch_add(&m->busy, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&m->frozen, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_sub(&m->busy, 1, __ATOMIC_SEQ_CST);
        return -1;
    }
    return 0;
}

void lane_lv_leave(struct bt_lvmap *m)
{
    __atomic_fetch_sub(&m->busy, 1, __ATOMIC_SEQ_CST);
}

int lane_lv_map(struct bt_lvmap *m, uint64_t off, uint32_t n, int write,
                uint64_t *base_off)
{
    uint64_t vc = off >> m->cluster_shift;
    uint64_t in = off & ((1ull << m->cluster_shift) - 1);
    if (n == 0 || in + n > (1ull << m->cluster_shift) || vc >= m->nclusters
        || (write && m->read_only))
        return -1;  /* (crossing a cluster: the Python path splits it) */
    uint64_t e = __atomic_load_n(&m->map[vc], __ATOMIC_ACQUIRE);
    if (e == BT_LV_UNMAPPED)
        return write ? -1 : 0;  /* (a first write: the Python path allocates) */
    if (write && !(e & BT_LV_OWN))
        return -1;  /* copy-on-write first */
    *base_off = (e & ~BT_LV_OWN) + in;
    return 1;
}
