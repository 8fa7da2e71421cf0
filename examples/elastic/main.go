// Command elastic holds the two quick starts of the seed designs, for real:
//
//   - single: reserve 128 GiB of virtual address space with no physical memory behind it, map
//     1 GiB on demand, use it, unmap it, and print the physical usage at each step (the
//     VirtualMemoryPool quick start).
//   - multi: two models under one physical limit (the SharedMemoryPool quick start): one fills
//     the limit, finishes half its requests, and the other takes the memory that frees, with
//     per-model and global stats at each step.
//
// It runs on the GPU when a CUDA driver is present and on the host backend otherwise; -device
// picks explicitly, -mode picks the quick start (both by default).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"os"

	"github.com/pagedkv/pagedkv/vmm"
)

func main() {
	device := flag.String("device", "auto", "host, cuda, cuda:N or auto")
	capacity := flag.Uint64("capacity", 128, "virtual capacity to reserve, GiB")
	mapGiB := flag.Uint64("map", 1, "memory to map on demand, GiB")
	mode := flag.String("mode", "both", "single, multi or both")
	limit := flag.Uint64("limit", 2, "multi: the shared physical limit, GiB")
	flag.Parse()
	log.SetFlags(0)
	if *mode == "single" || *mode == "both" {
		if err := run(os.Stdout, *device, *capacity<<30, *mapGiB<<30); err != nil {
			log.Fatalf("elastic: %v", err)
		}
	}
	if *mode == "multi" || *mode == "both" {
		if *mode == "both" {
			fmt.Println()
		}
		if err := runMulti(os.Stdout, *device, *limit<<30); err != nil {
			log.Fatalf("elastic: %v", err)
		}
	}
}

// run is the single-model quick start on device, written to w.
func run(w io.Writer, device string, capacity, size uint64) error {
	dev, err := vmm.Open(device)
	if err != nil {
		return err
	}
	defer dev.Close()
	fmt.Fprintf(w, "device: %s (granularity %d MiB)\n", dev.Info().Name, dev.Info().Granularity>>20)

	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: capacity})
	if err != nil {
		return err
	}
	defer pool.Close()
	report := func(step string) {
		s := pool.Stats()
		fmt.Fprintf(w, "%-28s virtual %7d MiB  physical %6d MiB  mapped pages %4d  mappings %4d\n",
			step, s.VirtualBytes>>20, s.PhysicalBytes>>20, s.MappedPages, s.Mappings)
	}
	report("reserved:")

	page := pool.PageSize()
	for off := uint64(0); off < size; off += page {
		if _, err := pool.Map(off, page); err != nil {
			return fmt.Errorf("map page at %d: %w", off, err)
		}
	}
	report(fmt.Sprintf("mapped %d MiB on demand:", size>>20))

	// Use the memory: fill it, then read the last bytes back.
	if err := dev.Memset(pool.Base(), 0x5A, size); err != nil {
		return err
	}
	tail := make([]byte, 8)
	if err := dev.CopyOut(tail, pool.Base()+vmm.Addr(size)-8); err != nil {
		return err
	}
	if !bytes.Equal(tail, bytes.Repeat([]byte{0x5A}, 8)) {
		return fmt.Errorf("read back %x, want 5a…", tail)
	}
	fmt.Fprintf(w, "wrote and read back %d MiB at %#x\n", size>>20, uint64(pool.Base()))

	for off := uint64(0); off < size; off += page {
		if err := pool.Unmap(off, page); err != nil {
			return err
		}
	}
	report("unmapped:")
	if err := pool.Close(); err != nil {
		return err
	}
	if err := dev.Close(); err != nil {
		return err
	}
	fmt.Fprintln(w, "closed: every reservation, handle and mapping returned")
	return nil
}
