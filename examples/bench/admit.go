package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/pagedkv/pagedkv/internal/workload/admit"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// admitChildEnv makes the bench program a model's process of the cross-process admission run:
// "ledger-path model-index".
const admitChildEnv = "PAGEDKV_BENCH_ADMIT_CHILD"

// admitConfig is the CI-size geometry of the admission trace: 64 blocks of 16 tokens per
// 256 KiB page, 72 pages (18 MiB) for all models together.
func admitConfig() (kvcache.Config, uint64) {
	const limit = 72 * (256 << 10)
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, ReservePages: 1, HighWatermark: 2, NoBackground: true, Capacity: limit}, limit
}

// benchAdmit measures the seed's time-to-first-token claim as what memory decides: queueing
// delay before admission, in engine steps, for three models with bursty, out-of-phase arrivals,
// each request admitted only when its prompt fits. Static thirds (static managers over thirds of
// one region), one SharedPool in one process, and three processes under one ledger (the bench
// program re-executed, stepped in lockstep, one process after another). It runs on the host
// backend: the delays count steps, which the device does not change.
func benchAdmit(_ vmm.Device, scale int) ([]Table, error) {
	o := admit.Default()
	if scale == 0 {
		o.Steps = 1800
	}
	cfg, limit := admitConfig()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	if err != nil {
		return nil, err
	}
	defer dev.Close()

	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: limit, PageSize: limit})
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	base, err := pool.Map(0, limit)
	if err != nil {
		return nil, err
	}
	share := limit / uint64(o.Models) / cfg.PageSize * cfg.PageSize
	var static []*kvcache.Manager
	for i := range o.Models {
		mem := vmm.External{Addr: base + vmm.Addr(uint64(i)*share), Size: share, Device: dev.Info().Ordinal, Kind: dev.Info().Kind}
		m, err := kvcache.NewStatic(dev, cfg, mem)
		if err != nil {
			return nil, err
		}
		defer m.Close()
		static = append(static, m)
	}
	sres, err := admit.Run(static, o)
	if err != nil {
		return nil, err
	}

	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit, CompactOnPressure: true})
	if err != nil {
		return nil, err
	}
	defer sp.Close()
	var shared []*kvcache.Manager
	for i := range o.Models {
		m, err := sp.Register(fmt.Sprint("model", i), cfg)
		if err != nil {
			return nil, err
		}
		shared = append(shared, m)
	}
	hres, err := admit.Run(shared, o)
	if err != nil {
		return nil, err
	}
	pres, err := admitAcrossProcesses(o, limit)
	if err != nil {
		return nil, fmt.Errorf("across processes: %w", err)
	}
	t := Table{
		Title: "Three models, bursty and out of phase: queueing before admission (time to first token), in steps",
		Note: fmt.Sprintf("host backend, CI size: %d MiB for all models, 64 blocks of 16 tokens per 256 KiB page; %d steps, each model busy "+
			"in turn for %d steps (%.2f arrivals/step, %.2f when quiet), prompts %d-%d tokens, outputs %d-%d; a request is admitted "+
			"first come first served when its whole prompt fits, a running one that cannot grow is preempted (freed, queued first). "+
			"Static: thirds of one region. Shared: one SharedPool. Across processes: one process per model, one ledger, stepped in lockstep (one process after another).",
			limit>>20, o.Steps, o.PhaseSteps, o.BusyRate, o.QuietRate, o.PromptMin, o.PromptMax, o.OutputMin, o.OutputMax),
		Columns: []string{"memory", "admitted", "never admitted", "preemptions", "p50", "p99", "mean", "static mean / mean"},
	}
	for _, r := range []struct {
		name string
		res  admit.Result
	}{{"static thirds", sres}, {"shared, one process", hres}, {"shared, 3 processes (ledger)", pres}} {
		t.Rows = append(t.Rows, []string{r.name, fmt.Sprint(r.res.Admitted), fmt.Sprint(r.res.Waiting), fmt.Sprint(r.res.Preemptions),
			fmt.Sprint(r.res.P50), fmt.Sprint(r.res.P99), fmt.Sprintf("%.1f", r.res.Mean),
			fmt.Sprintf("%.1fx", sres.Mean/max(r.res.Mean, 0.01))})
	}
	return []Table{t}, nil
}

// admitAcrossProcesses runs each model of the trace in a process of its own, under one ledger.
// Each step goes to one process after another, each answering before the next is sent, so
// which model gets a page never depends on how the OS schedules the processes.
func admitAcrossProcesses(o admit.Options, limit uint64) (admit.Result, error) {
	dir, err := os.MkdirTemp("", "pagedkv-admit")
	if err != nil {
		return admit.Result{}, err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "ledger")
	l, err := ledger.Open(path, ledger.Options{Limit: limit})
	if err != nil {
		return admit.Result{}, err
	}
	defer l.Close()
	self, err := os.Executable()
	if err != nil {
		return admit.Result{}, err
	}
	type child struct {
		cmd *exec.Cmd
		in  io.WriteCloser
		out *bufio.Scanner
	}
	var kids []child
	defer func() {
		for _, k := range kids {
			k.cmd.Process.Kill()
			k.cmd.Wait()
		}
	}()
	for i := range o.Models {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d", admitChildEnv, path, i, o.Steps))
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			return admit.Result{}, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return admit.Result{}, err
		}
		if err := cmd.Start(); err != nil {
			return admit.Result{}, err
		}
		kids = append(kids, child{cmd, in, bufio.NewScanner(out)})
	}
	var reports []admitReport
	for s := range o.Steps + 1 { // the last line asks for the report
		for _, k := range kids { // in turn, as one pool steps its models: the same run on every machine
			fmt.Fprintln(k.in, s)
			if !k.out.Scan() {
				return admit.Result{}, fmt.Errorf("a model's process ended at step %d", s)
			}
			if s == o.Steps {
				var r admitReport
				if err := json.Unmarshal(k.out.Bytes(), &r); err != nil {
					return admit.Result{}, err
				}
				reports = append(reports, r)
			} else if k.out.Text() != "ok" {
				return admit.Result{}, fmt.Errorf("step %d: %s", s, k.out.Text())
			}
		}
	}
	var all []int
	waiting, preempts := 0, 0
	for _, r := range reports {
		all = append(all, r.Delays...)
		waiting += r.Waiting
		preempts += r.Preemptions
	}
	return admit.FromDelays(all, waiting, preempts), nil
}

// admitReport is what a model's process reports at the end.
type admitReport struct {
	Delays               []int
	Waiting, Preemptions int
}

// admitChild is a model's process: it joins the ledger, steps its model for every step number
// read from stdin ("ok" or the error after each), and at the last reports its delays as JSON.
func admitChild(spec string) error {
	var path string
	var idx, steps int
	if _, err := fmt.Sscanf(spec, "%s %d %d", &path, &idx, &steps); err != nil {
		return err
	}
	o := admit.Default()
	o.Steps = steps
	cfg, _ := admitConfig()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	if err != nil {
		return err
	}
	defer dev.Close()
	// The others wait on stdin while this process steps, so they answer its requests at once;
	// the long timeout only guards against a hang, and a loaded machine never changes the run.
	l, err := ledger.Open(path, ledger.Options{RequestTimeout: time.Minute})
	if err != nil {
		return err
	}
	defer l.Close()
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l, CompactOnPressure: true})
	if err != nil {
		return err
	}
	defer sp.Close()
	m, err := sp.Register("model"+strconv.Itoa(idx), cfg)
	if err != nil {
		return err
	}
	x := admit.NewModel(m, idx, o)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		s, err := strconv.Atoi(in.Text())
		if err != nil {
			return err
		}
		if s == steps {
			b, _ := json.Marshal(admitReport{Delays: x.Delays(), Waiting: x.Waiting(), Preemptions: x.Preemptions()})
			fmt.Println(string(b))
			return nil
		}
		if err := x.Step(s); err != nil {
			fmt.Println(err)
			return err
		}
		fmt.Println("ok")
	}
	return in.Err()
}
