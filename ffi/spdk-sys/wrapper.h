/* The public SPDK headers the agent uses, and the shims for what bindgen cannot bind (static inline functions,
 * fields reached through unions). */
#include <spdk/stdinc.h>
#include <spdk/bdev.h>
#include <spdk/bdev_module.h>
#include <spdk/env.h>
#include <spdk/event.h>
#include <spdk/nvme.h>
#include <spdk/nvmf.h>
#include <spdk/thread.h>
#include <spdk/uuid.h>

#include "shim.h"
