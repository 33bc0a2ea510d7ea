/*
 * vmmshim's compiled AHCI data command (built and loaded by ahcifast.py; vmmshim's own code).
 *
 * Serves one issued command slot of an ATA disk port, the part of the command that moves data:
 *
 * - Serial ATA AHCI 1.3.1 section 4.2.2, the command header: DW0 flags (A, ATAPI: bit 5) and PRDTL (bits 31:16),
 *   DW1 PRDBC (written by the caller, not here), DW2-3 CTBA (128-byte aligned: bits 6:0 are reserved);
 * - section 4.2.3, the command table: the command FIS at offset 0, the PRDT from offset 80h, an entry being DBA
 *   (bit 0 reserved: word aligned) then DW3's DBC (bits 21:0, the byte count minus one; the I bit is ignored);
 * - section 5.6, the data transfers: the device moves the command's bytes through the PRDT in order;
 * - Serial ATA 3.x section 10.5.5, the Register Host to Device FIS (type 27h, C bit in byte 1);
 * - ATA/ATAPI Command Set (ACS-3) READ DMA (C8h) and WRITE DMA (CAh) with their 28-bit LBA (LBA 27:24 in the
 *   device field) and 8-bit count (0 means 256), READ DMA EXT (25h) and WRITE DMA EXT (35h) with a 48-bit LBA
 *   and 16-bit count (0 means 65536), and NCQ's READ FPDMA QUEUED (60h) and WRITE FPDMA QUEUED (61h), whose
 *   16-bit count is in the FEATURE field (0 means 65536).
 *
 * The header, the command FIS and every PRDT entry are read from guest memory once, into locals, and checked
 * before use: the header, the whole command table (PRDTL entries, as the Python path fetches it) and every byte
 * the PRDT hands over must lie in [ram, ram + ram_len), with no overflow in address + length. The transfer is
 * one preadv/pwritev (retried while short) between the image and guest memory, with the GIL released. A DMA
 * command moves its data in vmmshim_ahci_slot; an NCQ command is only checked there and moved by
 * vmmshim_ahci_transfer, once the caller has accepted it (its D2H FIS, PxCI), in the Python path's order.
 *
 * Anything else returns VMMSHIM_AHCI_FALLBACK with nothing read from the image and nothing written to guest memory
 * or to the image, and the device's Python path serves the command as it always does (aborts, ID NOT FOUND and
 * host bus faults included): another command, the A bit, a control FIS, a range past the end of the image, a
 * write to a read-only image, a PRDT holding fewer bytes than the transfer, more than MAX_SEGS buffers, anything
 * outside the first RAM area. A host I/O error during the transfer is handed back as its errno (out->error, or
 * vmmshim_ahci_transfer's result), and the caller answers ABORT as the Python path does for the same error
 * (falling back after an NCQ command was accepted would accept it twice, and a retry would write twice).
 *
 * What stays with the caller: PRDBC, the FISes (the NCQ acceptance D2H FIS, the Set Device Bits or D2H FIS),
 * PxTFD, PxCI, PxSACT, PxIS and the interrupt, the flush asked for by FUA or a disabled write cache.
 *
 * Not supported: ATAPI (PACKET) commands, the PIO commands (READ/WRITE SECTORS, MULTIPLE), FLUSH, TRIM and the
 * other non-data commands, port multipliers, command tables or buffers above the first RAM area (highmem).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "fastpath.h"

#define MAX_SLOTS 32u
#define HEADER_SIZE 32u             /* one command header in the command list */
#define HEADER_READ 16u             /* the part the Python path reads: flags, PRDTL, PRDBC, CTBA */
#define HDR_ATAPI 0x20u             /* DW0 bit 5: A */
#define CTBA_ALIGN 0x7Fu
#define CFIS_BYTES 20u              /* a Register H2D FIS */
#define PRDT_OFFSET 0x80u
#define PRD_SIZE 16u
#define PRD_DBC_MASK 0x3FFFFFu
#define PRD_DBA_MASK (~(uint64_t)1)
#define MAX_SEGS 1024u              /* IOV_MAX on Linux */
#define MAX_SECTOR_SIZE 65536u

#define FIS_TYPE_H2D 0x27u
#define H2D_C 0x80u

/* the Register H2D FIS's bytes */
#define F_TYPE 0
#define F_FLAGS 1
#define F_COMMAND 2
#define F_FEATURE 3
#define F_LBA0 4
#define F_DEVICE 7
#define F_LBA3 8
#define F_FEATURE_EXP 11
#define F_COUNT 12
#define F_COUNT_EXP 13
#define DEVICE_LBA27_MASK 0x0Fu

#define READ_DMA_EXT 0x25u
#define WRITE_DMA_EXT 0x35u
#define READ_FPDMA_QUEUED 0x60u
#define WRITE_FPDMA_QUEUED 0x61u
#define READ_DMA 0xC8u
#define WRITE_DMA 0xCAu
#define COUNT28_ZERO 256u
#define COUNT48_ZERO 65536u

#define VMMSHIM_AHCI_FALLBACK (-1)

struct vmmshim_ahci_out {
	uint8_t cfis[CFIS_BYTES];   /* the command FIS as read */
	uint16_t flags;             /* the header's DW0 bits 15:0 */
	uint16_t prdtl;
	uint32_t queued;            /* NCQ: checked, not moved yet (vmmshim_ahci_transfer moves it) */
	int32_t error;              /* the errno of a failed transfer, else 0 */
};

/* a checked command's transfer, between vmmshim_ahci_slot and vmmshim_ahci_transfer (the caller's memory) */
struct state {
	struct iovec iov[MAX_SEGS];
	uint64_t offset, length;
	int fd, write, nseg, pending;
};

static uint64_t le(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;

	while (n--)
		v = v << 8 | p[n];
	return v;
}

/* the command's direction, LBA and sector count from the FIS; 0 for a command not served here */
static int decode(const uint8_t *c, int *write, uint64_t *lba, uint64_t *count)
{
	uint64_t lba48 = le(c + F_LBA0, 3) | le(c + F_LBA3, 3) << 24;

	switch (c[F_COMMAND]) {
	case READ_DMA:
	case WRITE_DMA:
		*write = c[F_COMMAND] == WRITE_DMA;
		*lba = le(c + F_LBA0, 3) | (uint64_t)(c[F_DEVICE] & DEVICE_LBA27_MASK) << 24;
		*count = c[F_COUNT] ? c[F_COUNT] : COUNT28_ZERO;
		return 1;
	case READ_DMA_EXT:
	case WRITE_DMA_EXT:
		*write = c[F_COMMAND] == WRITE_DMA_EXT;
		*lba = lba48;
		*count = c[F_COUNT] | (uint64_t)c[F_COUNT_EXP] << 8;
		break;
	case READ_FPDMA_QUEUED:
	case WRITE_FPDMA_QUEUED:
		*write = c[F_COMMAND] == WRITE_FPDMA_QUEUED;
		*lba = lba48;
		*count = c[F_FEATURE] | (uint64_t)c[F_FEATURE_EXP] << 8;
		break;
	default:
		return 0;
	}
	if (!*count)
		*count = COUNT48_ZERO;
	return 1;
}

size_t vmmshim_ahci_state_size(void)
{
	return sizeof(struct state);
}

/* the prepared transfer: 0, or an errno */
int32_t vmmshim_ahci_transfer(void *opaque)
{
	struct state *st = opaque;
	uint64_t moved;

	if (!st->pending)
		return EINVAL;
	st->pending = 0;
	return transfer_all(st->fd, st->write, st->iov, st->nseg, st->offset, st->length, &moved);
}

/*
 * Slot `slot` of the command list at guest address `cmdlist`, for an image of `sectors` sectors of `sector_size`
 * bytes open as `fd`: checks it whole and keeps its transfer in `opaque` (vmmshim_ahci_state_size bytes). A
 * command that is not queued is then moved at once (out->error: 0, or the errno of the failed transfer); an NCQ
 * command is left for vmmshim_ahci_transfer (out->queued), so that the caller accepts it first, as the Python
 * path does. Returns the bytes the command moves, or VMMSHIM_AHCI_FALLBACK (see the comment at the top).
 */
int64_t vmmshim_ahci_slot(uint8_t *ram, uint64_t ram_len, uint64_t cmdlist, uint32_t slot, int fd,
			  uint64_t sectors, uint32_t sector_size, int readonly, void *opaque,
			  struct vmmshim_ahci_out *out)
{
	struct state *st = opaque;
	struct iovec *iov = st->iov;
	uint8_t hdr[HEADER_READ], prd[PRD_SIZE], c[CFIS_BYTES];
	uint64_t header, table, lba, count, length, left;
	uint32_t flags, prdtl, i, nseg = 0;
	int write;

	st->pending = 0;
	if (slot >= MAX_SLOTS || !sector_size || sector_size > MAX_SECTOR_SIZE || cmdlist > ram_len)
		return VMMSHIM_AHCI_FALLBACK;
	header = cmdlist + (uint64_t)slot * HEADER_SIZE;
	if (!in_ram(header, HEADER_READ, ram_len))
		return VMMSHIM_AHCI_FALLBACK;
	memcpy(hdr, ram + header, HEADER_READ);
	flags = (uint32_t)le(hdr, 2);
	prdtl = (uint32_t)le(hdr + 2, 2);
	table = le(hdr + 8, 8) & ~(uint64_t)CTBA_ALIGN;
	if (flags & HDR_ATAPI || !in_ram(table, PRDT_OFFSET + (uint64_t)prdtl * PRD_SIZE, ram_len))
		return VMMSHIM_AHCI_FALLBACK;
	memcpy(c, ram + table, CFIS_BYTES);
	if (c[F_TYPE] != FIS_TYPE_H2D || !(c[F_FLAGS] & H2D_C) || !decode(c, &write, &lba, &count))
		return VMMSHIM_AHCI_FALLBACK;
	if (lba > sectors || count > sectors - lba || (write && readonly))
		return VMMSHIM_AHCI_FALLBACK;
	length = count * sector_size;           /* at most 2^16 * 2^16 */
	left = length;
	for (i = 0; i < prdtl && left; i++) {
		uint64_t dba, n;

		memcpy(prd, ram + table + PRDT_OFFSET + (uint64_t)i * PRD_SIZE, PRD_SIZE);
		dba = le(prd, 8) & PRD_DBA_MASK;
		n = (le(prd + 12, 4) & PRD_DBC_MASK) + 1;
		if (n > left)
			n = left;
		if (nseg == MAX_SEGS || !in_ram(dba, n, ram_len))
			return VMMSHIM_AHCI_FALLBACK;
		iov[nseg].iov_base = ram + dba;
		iov[nseg].iov_len = (size_t)n;
		nseg++;
		left -= n;
	}
	if (left)
		return VMMSHIM_AHCI_FALLBACK;
	st->offset = lba * sector_size;         /* lba + count <= sectors: within the image */
	st->length = length;
	st->fd = fd;
	st->write = write;
	st->nseg = (int)nseg;
	st->pending = 1;
	memcpy(out->cfis, c, CFIS_BYTES);
	out->flags = (uint16_t)flags;
	out->prdtl = (uint16_t)prdtl;
	out->queued = c[F_COMMAND] == READ_FPDMA_QUEUED || c[F_COMMAND] == WRITE_FPDMA_QUEUED;
	out->error = out->queued ? 0 : vmmshim_ahci_transfer(st);
	return (int64_t)length;
}
