/* Shims over SPDK's static inline functions and bdev_io fields, so the Rust side never depends on the layout of
 * unions bindgen names differently between SPDK releases. Each is a plain call or field read. */
#ifndef DPU_SPDK_SHIM_H
#define DPU_SPDK_SHIM_H

#include <spdk/bdev_module.h>
#include <spdk/thread.h>

/* The type (read, write, flush, unmap, write zeroes, reset) of a bdev I/O. */
int dpu_spdk_bdev_io_type(const struct spdk_bdev_io *io);
/* The block range of a read, write, unmap, write zeroes or flush. */
uint64_t dpu_spdk_bdev_io_offset_blocks(const struct spdk_bdev_io *io);
uint64_t dpu_spdk_bdev_io_num_blocks(const struct spdk_bdev_io *io);
/* The data buffers of a read or write; *iovcnt receives their count. */
struct iovec *dpu_spdk_bdev_io_iovs(struct spdk_bdev_io *io, int *iovcnt);
/* The bdev an I/O is addressed to, and that bdev's module context (`ctxt`). */
void *dpu_spdk_bdev_io_ctxt(const struct spdk_bdev_io *io);
/* The per-channel context area of an I/O channel. */
void *dpu_spdk_io_channel_get_ctx(struct spdk_io_channel *ch);

#endif
