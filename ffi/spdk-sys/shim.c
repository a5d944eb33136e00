#include "shim.h"

int dpu_spdk_bdev_io_type(const struct spdk_bdev_io *io)
{
	return io->type;
}

uint64_t dpu_spdk_bdev_io_offset_blocks(const struct spdk_bdev_io *io)
{
	return io->u.bdev.offset_blocks;
}

uint64_t dpu_spdk_bdev_io_num_blocks(const struct spdk_bdev_io *io)
{
	return io->u.bdev.num_blocks;
}

struct iovec *dpu_spdk_bdev_io_iovs(struct spdk_bdev_io *io, int *iovcnt)
{
	*iovcnt = io->u.bdev.iovcnt;
	return io->u.bdev.iovs;
}

void *dpu_spdk_bdev_io_ctxt(const struct spdk_bdev_io *io)
{
	return io->bdev->ctxt;
}

void *dpu_spdk_io_channel_get_ctx(struct spdk_io_channel *ch)
{
	return spdk_io_channel_get_ctx(ch);
}
