/* Logical volumes in the C lane (lane_lvol.c): a volume's cluster map, which the lane
 * consults to send a command on a volume to the volume's cluster on the base.
 *
 * The map is C memory that the Python side owns and fills (blocktarget/lvol/lanemap.py);
 * reactor threads only read it. The rules that keep the lane from ever using a mapping
 * the durable metadata does not have (lvol/lanemap.py has the Python half):
 *
 * (a) an entry is set only after the metadata naming it was committed (written and
 *     flushed), with one atomic 8-byte store: a reader sees the old entry or the new;
 * (b) before a change that alters or drops mappings (snapshot, resize, delete,
 *     Deallocate, decouple, read-only, ...) Python sets `frozen` and waits until `busy`
 *     is 0: every lane command that read an entry counted itself in `busy` before reading
 *     it and stays counted until its base I/O completed, so once `busy` was seen 0 after
 *     the freeze, no lane I/O uses the old mappings and their clusters may be freed;
 *     while frozen, the lane hands the volume's commands to the Python path;
 * (c) the lane counts a volume's commands on the volume's channel and the base's
 *     (LaneTarget.channels), as the Python path's forwarding does; (b) stands in for the
 *     store's I/O epochs, which only the Python path's I/O enters.
 *
 * Everything else goes to the Python path, the reference: a write to a cluster the
 * volume does not own (allocation, copy-on-write), a command crossing a cluster
 * boundary, Flush, a FUA write on a volatile cache, any other opcode, a read-only
 * volume's write.
 */
#ifndef BT_LVOL_H
#define BT_LVOL_H

#include <stdint.h>

/* ---- cdef begin ---- */

struct bt_lvmap {
    uint64_t *map;          /* per virtual cluster: all ones (unmapped: reads zeroes), or
                               the byte offset of the cluster on the base, bit 0 set when
                               the volume owns it (else it is a parent's: reads only) */
    uint64_t nclusters;
    uint32_t cluster_shift; /* log2 of the cluster size (a power of two, as SPDK's) */
    uint8_t read_only;      /* writes are the Python path's (Write Protected) */
    uint32_t frozen;        /* a metadata change is under way: nothing new starts */
    uint32_t busy;          /* lane commands between their map lookup and completion */
};

/* an atomic store of one entry (rule a) */
void bt_lvmap_set(struct bt_lvmap *m, uint64_t vc, uint64_t entry);
/* frozen on (1) or off (0), ordered before any later load of busy (rule b) */
void bt_lvmap_freeze(struct bt_lvmap *m, int on);
uint32_t bt_lvmap_busy(const struct bt_lvmap *m);

/* ---- cdef end ---- */

#define BT_LV_UNMAPPED UINT64_MAX
#define BT_LV_OWN 1ull

/* Inside the lane (lane.c): begin using the map (0), or -1 when frozen (nothing held). */
int lane_lv_enter(struct bt_lvmap *m);
/* done with the map (after the base I/O completed) */
void lane_lv_leave(struct bt_lvmap *m);
/* Where [off, off + n) of the volume lies on the base: 1 in one cluster the command may
   use (a write: the volume's own), *base_off set; 0 a read of an unmapped cluster
   (zeroes); -1 the Python path's. Only between enter and leave. */
int lane_lv_map(struct bt_lvmap *m, uint64_t off, uint32_t n, int write,
                uint64_t *base_off);

#endif
