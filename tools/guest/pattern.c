/*
 * pattern: the guest side of dmemfs-fuse's QEMU end-to-end test.
 *
 * Runs inside a tiny Linux guest (as a child of the initramfs's /init).  It
 * fills a buffer of anonymous memory with a pattern the host can recompute,
 * pins the pages where they are (mlock), asks the kernel where each page
 * lives in guest-physical memory (/proc/self/pagemap; root sees PFNs), and
 * prints those runs on the console.  The host then looks for the pattern at
 * exactly those offsets of the file backing the guest's RAM.
 *
 * The process keeps the memory until the machine is off: freed pages could be
 * reused (and zeroed: init_on_alloc) before QEMU exits.  It then reads
 * commands from stdin, one per line, from the host:
 *     fill <mib>   take <mib> MiB of fresh anonymous memory, write a pattern
 *                  into every word, read it all back, free it, and say whether
 *                  it matched (memory a balloon gave back must work again);
 *     go           (or any other line, or end of input) sync and power the
 *                  machine off.
 *
 * Word i of page p (64-bit, little endian) is
 *     (seed + p * 512 + i) * 0x9E3779B97F4A7C15  (mod 2^64)
 * so every word of the buffer differs and depends on the host's seed.
 *
 * Environment (from the kernel command line): dmemfs_seed (hex), dmemfs_mib.
 * Output lines, all prefixed so the host can parse them:
 *     DMEMFS-RUN <first page> <first pfn> <pages>      (hex, hex, decimal)
 *     DMEMFS-PATTERN-READY pages=<n> seed=<hex>
 *     DMEMFS-FILL-OK mib=<n>  or  DMEMFS-FILL-FAILED <reason>
 *     DMEMFS-PATTERN-FAILED <reason>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <unistd.h>

#define PAGE 4096UL
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define PFN_MASK ((UINT64_C(1) << 55) - 1)
#define PRESENT (UINT64_C(1) << 63)

static int fail(const char *what)
{
	printf("DMEMFS-PATTERN-FAILED %s: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

/* Write and check <mib> MiB of new memory; the words depend on their address and the round. */
static void fill(unsigned long mib, uint64_t round)
{
	size_t length = mib * (1UL << 20);
	uint64_t *mem = mmap(NULL, length, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED) {
		printf("DMEMFS-FILL-FAILED mmap %lu MiB: %s\n", mib, strerror(errno));
		fflush(stdout);
		return;
	}
	size_t count = length / sizeof(uint64_t);
	for (size_t i = 0; i < count; i++)
		mem[i] = (round + i) * GOLDEN;
	size_t bad = count;
	for (size_t i = 0; i < count && bad == count; i++)
		if (mem[i] != (round + i) * GOLDEN)
			bad = i;
	munmap(mem, length);
	if (bad == count)
		printf("DMEMFS-FILL-OK mib=%lu\n", mib);
	else
		printf("DMEMFS-FILL-FAILED word %zu of %lu MiB differs\n", bad, mib);
	fflush(stdout);
}

int main(void)
{
	const char *seed_text = getenv("dmemfs_seed");
	const char *mib_text = getenv("dmemfs_mib");
	uint64_t seed = seed_text ? strtoull(seed_text, NULL, 16) : 0x5eed;
	unsigned long mib = mib_text ? strtoul(mib_text, NULL, 10) : 16;
	unsigned long pages = mib * (1UL << 20) / PAGE;
	unsigned long words = PAGE / sizeof(uint64_t);

	uint64_t *buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED)
		return fail("mmap");
	if (mlock(buf, pages * PAGE))
		return fail("mlock");
	for (unsigned long p = 0; p < pages; p++)
		for (unsigned long i = 0; i < words; i++)
			buf[p * words + i] = (seed + p * words + i) * GOLDEN;

	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return fail("open /proc/self/pagemap");
	uint64_t *entries = calloc(pages, sizeof(uint64_t));
	if (!entries)
		return fail("calloc");
	off_t where = (off_t)((uintptr_t)buf / PAGE * sizeof(uint64_t));
	if (pread(fd, entries, pages * sizeof(uint64_t), where) !=
	    (ssize_t)(pages * sizeof(uint64_t)))
		return fail("pread pagemap");
	close(fd);

	unsigned long first = 0;
	for (unsigned long p = 0; p < pages; p++) {
		if (!(entries[p] & PRESENT) || !(entries[p] & PFN_MASK)) {
			errno = EFAULT;
			return fail("page not present or PFN hidden");
		}
		uint64_t pfn = entries[p] & PFN_MASK;
		int last = p + 1 == pages ||
			   (entries[p + 1] & PFN_MASK) != pfn + 1;
		if (last) {
			printf("DMEMFS-RUN %lx %" PRIx64 " %lu\n", first,
			       (uint64_t)(entries[first] & PFN_MASK), p + 1 - first);
			first = p + 1;
		}
	}
	printf("DMEMFS-PATTERN-READY pages=%lu seed=%" PRIx64 "\n", pages, seed);
	fflush(stdout);

	char line[64];
	uint64_t round = seed;
	unsigned long fill_mib;
	for (;;) {
		if (!fgets(line, sizeof(line), stdin)) {
			printf("DMEMFS-PATTERN: stdin closed; powering off\n");
			break;
		}
		if (sscanf(line, "fill %lu", &fill_mib) == 1)
			fill(fill_mib, ++round << 32);
		else
			break;
	}
	printf("DMEMFS-POWEROFF\n");
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return fail("reboot");
}
