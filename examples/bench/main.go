// Command bench measures pagedkv against yardsticks taken in the same run and prints the
// side-by-side tables that docs/performance.md quotes. Every figure is a ratio to a yardstick
// measured by the same process on the same device, never an absolute target.
//
//	go run ./examples/bench -device host           # host backend
//	.gpu/bench -device cuda -md out.md -json out.json  # on the GPU machine
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/vmm"
)

// Table is one result table.
type Table struct {
	Title   string     `json:"title"`
	Note    string     `json:"note,omitempty"`
	Columns []string   `json:"columns"`
	Rows    [][]string `json:"rows"`
}

// Report is everything one run measured.
type Report struct {
	Date   string  `json:"date"`
	Device string  `json:"device"`
	Driver string  `json:"driver"`
	Tables []Table `json:"tables"`
}

func main() {
	if spec := os.Getenv(admitChildEnv); spec != "" {
		if err := admitChild(spec); err != nil {
			log.Fatalf("bench: admission child: %v", err)
		}
		return
	}
	if child, err := hotChild(); child {
		if err != nil {
			log.Fatalf("bench: hot paths child: %v", err)
		}
		return
	}
	device := flag.String("device", "auto", "host, cuda, cuda:N or auto")
	mdPath := flag.String("md", "", "also write the tables as Markdown to this file")
	jsonPath := flag.String("json", "", "also write the tables as JSON to this file")
	only := flag.String("only", "", "comma-separated sections to run (default all): kernels, vmm, growth, manager, churn, bursty, prefix, multi, multicalls, swap, preempt, admit, memory, events, tiers")
	flag.StringVar(&tierDir, "tier-dir", "", "the directory the tiers section's disk store uses (default: a temporary one under $TMPDIR)")
	quick := flag.Bool("quick", false, "fewer iterations (a smoke test, not a measurement)")
	flag.Parse()
	log.SetFlags(0)

	dev, err := vmm.Open(*device)
	if err != nil {
		log.Fatalf("bench: %v", err)
	}
	rep := Report{Date: time.Now().UTC().Format("2006-01-02"), Device: dev.Info().Name, Driver: "none (host backend)"}
	if dev.Info().Kind == vmm.MemoryDevice {
		v, _ := cuda.DriverVersion()
		rep.Driver = fmt.Sprintf("CUDA %d.%d driver API", v/1000, v%1000/10)
	}
	iters := 1
	if *quick {
		iters = 0
	}
	sections := []struct {
		name string
		run  func(vmm.Device, int) ([]Table, error)
	}{
		{"kernels", benchKernels},
		{"vmm", benchVMM},
		{"growth", benchGrowth},
		{"manager", benchManager},
		{"churn", benchChurn},
		{"bursty", benchBursty},
		{"prefix", benchPrefix},
		{"multi", benchMulti},
		{"multicalls", benchMultiCalls},
		{"swap", benchSwap},
		{"preempt", benchPreempt},
		{"memory", benchMemory},
		{"events", benchEvents},
		{"admit", benchAdmit},
		{"tiers", benchTiers},
	}
	for _, s := range sections {
		if *only != "" && !strings.Contains(","+*only+",", ","+s.name+",") {
			continue
		}
		ts, err := s.run(dev, iters)
		if err != nil {
			log.Fatalf("bench %s: %v", s.name, err)
		}
		rep.Tables = append(rep.Tables, ts...)
	}
	if err := dev.Close(); err != nil {
		log.Fatalf("bench: close device: %v", err)
	}
	md := rep.Markdown()
	fmt.Print(md)
	if *mdPath != "" {
		if err := os.WriteFile(*mdPath, []byte(md), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	if *jsonPath != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*jsonPath, append(b, '\n'), 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

// Markdown renders the report.
func (r Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Run %s on %s, %s.\n\n", r.Date, r.Device, r.Driver)
	for _, t := range r.Tables {
		fmt.Fprintf(&b, "### %s\n\n", t.Title)
		if t.Note != "" {
			fmt.Fprintf(&b, "%s\n\n", t.Note)
		}
		fmt.Fprintf(&b, "| %s |\n|%s\n", strings.Join(t.Columns, " | "), strings.Repeat(" --- |", len(t.Columns)))
		for _, row := range t.Rows {
			fmt.Fprintf(&b, "| %s |\n", strings.Join(row, " | "))
		}
		b.WriteString("\n")
	}
	return b.String()
}
