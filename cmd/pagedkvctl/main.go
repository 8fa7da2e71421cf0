// Command pagedkvctl watches and steers the processes that share one GPU through a pagedkv
// ledger (kvcache.SharedConfig.Ledger): who holds how much, the limit they share, a live view,
// and their prefix caches.
//
//	pagedkvctl [-ledger PATH] [-json] list
//	pagedkvctl [-ledger PATH] [-json] [-timeout 2s] limit BYTES|PCT%     (40G, 512M, 1073741824, 50%)
//	pagedkvctl [-ledger PATH] top [-n N] [-i 1s]
//	pagedkvctl [-ledger PATH] [-json] [-timeout 2s] drop-cache [MEMBER]
//
// The ledger path defaults to $PAGEDKV_LEDGER, else /dev/shm/pagedkv. pagedkvctl never creates
// a ledger: the serving processes do. -timeout bounds the wait for each member asked to give
// back memory or drop its cache; a member that does not answer in time (a stopped process) is
// skipped. drop-cache without MEMBER asks every member; an empty MEMBER is a usage error. The
// exit status is 0 on success, 2 for a usage error and 1 for any other failure.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pagedkv/pagedkv/ledger"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt)
	done := make(chan struct{})
	go func() { <-stop; close(done) }()
	if err := run(os.Args[1:], os.Stdout, done); err != nil {
		fmt.Fprintln(os.Stderr, "pagedkvctl:", err)
		os.Exit(exitCode(err))
	}
}

// exitCode is the exit status of a run that failed with err: 2 for a command line that cannot
// be carried out as written (errUsage, as the flag package's commands use), 1 for anything else.
func exitCode(err error) int {
	if errors.Is(err, errUsage) {
		return 2
	}
	return 1
}

// DefaultLedger is the ledger path used without -ledger and $PAGEDKV_LEDGER.
const DefaultLedger = "/dev/shm/pagedkv"

var errUsage = errors.New("usage: pagedkvctl [-ledger PATH] [-json] [-timeout DUR] list | limit BYTES|PCT% | top [-n N] [-i DUR] | drop-cache [MEMBER]")

// run carries out one command line, writing to out; top stops at done.
func run(args []string, out io.Writer, done <-chan struct{}) error {
	fs := flag.NewFlagSet("pagedkvctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	path := fs.String("ledger", envOr("PAGEDKV_LEDGER", DefaultLedger), "the ledger file")
	asJSON := fs.Bool("json", false, "print JSON, for scripts")
	timeout := fs.Duration("timeout", 2*time.Second, "how long to wait for each member's answer")
	if err := fs.Parse(args); err != nil || fs.NArg() == 0 || *timeout <= 0 {
		return errUsage
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	n, every, err := checkArgs(cmd, rest) // before the ledger: a mistyped command is no missing ledger
	if err != nil {
		return err
	}
	l, err := ledger.Open(*path, ledger.Options{MustExist: true, RequestTimeout: *timeout})
	if err != nil {
		return err
	}
	defer l.Close()
	switch cmd {
	case "list":
		s, err := l.Snapshot()
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(out, listJSON(s))
		}
		return writeList(out, s)
	case "limit":
		limit, err := parseLimit(rest[0], l.DeviceBytes())
		if err != nil {
			return err
		}
		r, err := l.SetLimit(limit)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(out, r)
		}
		fmt.Fprintf(out, "limit %s, used %s", size(r.Limit), size(r.Used))
		if r.Shortfall > 0 {
			fmt.Fprintf(out, " (live data needs %s more than the limit: no new pages until it frees)", size(r.Shortfall))
		}
		fmt.Fprintln(out)
		return nil
	case "top":
		return top(l, out, n, every, done)
	case "drop-cache":
		name := ""
		if len(rest) == 1 {
			name = rest[0]
		}
		k, err := l.DropCache(name)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(out, map[string]int{"members": k})
		}
		fmt.Fprintf(out, "asked %d member(s) to drop their prefix cache\n", k)
		return nil
	}
	return errUsage
}

// checkArgs checks the arguments of command cmd (errUsage) and returns top's -n and -i.
func checkArgs(cmd string, rest []string) (n int, every time.Duration, err error) {
	switch cmd {
	case "list":
		if len(rest) != 0 {
			return 0, 0, errUsage
		}
	case "limit":
		if len(rest) != 1 {
			return 0, 0, errUsage
		}
	case "top":
		tf := flag.NewFlagSet("top", flag.ContinueOnError)
		tf.SetOutput(io.Discard)
		tf.IntVar(&n, "n", 0, "refreshes before exiting (0: until interrupted)")
		tf.DurationVar(&every, "i", time.Second, "refresh interval")
		if err := tf.Parse(rest); err != nil || tf.NArg() != 0 || every <= 0 || n < 0 { // "top 5" meant -n 5
			return 0, 0, errUsage
		}
	case "drop-cache":
		if len(rest) > 1 || len(rest) == 1 && rest[0] == "" { // drop-cache "$UNSET" must not drop every cache
			return 0, 0, errUsage
		}
	default:
		return 0, 0, errUsage
	}
	return n, every, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// parseLimit reads 1073741824, 512K, 512M, 40G, 1T (powers of 1024) or 50% of the device.
func parseLimit(s string, device uint64) (uint64, error) {
	if pct, ok := strings.CutSuffix(s, "%"); ok {
		p, err := strconv.ParseFloat(pct, 64)
		if err != nil || !(p > 0 && p <= 100) { // NaN too
			return 0, fmt.Errorf("limit %q: a percentage is in (0, 100]", s)
		}
		if device == 0 {
			return 0, fmt.Errorf("limit %q: the ledger does not know the device's memory (ledger.Options.DeviceBytes); give bytes", s)
		}
		v := device // float rounding may overshoot, to 2^64 itself near the top, where uint64() is undefined
		if f := p / 100 * float64(device); f < float64(device) {
			v = min(uint64(f), device)
		}
		if v == 0 {
			return 0, fmt.Errorf("limit %q: %v%% of %d bytes is no byte", s, p, device)
		}
		return v, nil
	}
	mult := uint64(1)
	if i := strings.IndexAny(s, "KMGTkmgt"); i == len(s)-1 && i > 0 {
		mult = 1 << (10 * (1 + strings.IndexByte("KMGT", s[i]&^0x20)))
		s = s[:i]
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v == 0 || v > ^uint64(0)/mult {
		return 0, fmt.Errorf("limit %q: want a positive size like 40G, 512M or 1073741824, or a percentage", s)
	}
	return v * mult, nil
}

// size prints bytes in binary units.
func size(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%d B", b)
}

func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// memberJSON is one member in list -json.
type memberJSON struct {
	Name         string  `json:"name"`
	PID          int     `json:"pid"`
	MappedBytes  uint64  `json:"mapped_bytes"`
	Sequences    int     `json:"sequences"`
	LiveBlocks   int     `json:"live_blocks"`
	CachedBlocks int     `json:"cached_blocks"`
	HitRate      float64 `json:"prefix_hit_rate"`
	PageOverhead float64 `json:"page_overhead"`
	AllowCompact bool    `json:"allow_compact"`
}

type listOut struct {
	LimitBytes  uint64       `json:"limit_bytes"`
	UsedBytes   uint64       `json:"used_bytes"`
	DeviceBytes uint64       `json:"device_bytes,omitempty"`
	Members     []memberJSON `json:"members"`
	Reaped      []string     `json:"reaped,omitempty"`
}

func listJSON(s ledger.Snapshot) listOut {
	o := listOut{LimitBytes: s.Limit, UsedBytes: s.Used, DeviceBytes: s.DeviceBytes, Reaped: s.Reaped, Members: []memberJSON{}}
	for _, m := range s.Members {
		o.Members = append(o.Members, memberJSON{
			Name: m.Name, PID: m.PID, MappedBytes: m.Mapped, Sequences: m.Usage.Sequences, LiveBlocks: m.Usage.LiveBlocks,
			CachedBlocks: m.Usage.CachedBlocks, HitRate: m.Usage.HitRate(), PageOverhead: m.Usage.PageOverhead, AllowCompact: m.AllowCompact,
		})
	}
	return o
}

// writeList prints the limit line and a table of members.
func writeList(out io.Writer, s ledger.Snapshot) error {
	pct := ""
	if s.Limit > 0 {
		pct = fmt.Sprintf(" (%.0f%%)", 100*float64(s.Used)/float64(s.Limit))
	}
	fmt.Fprintf(out, "limit %s   used %s%s   members %d", size(s.Limit), size(s.Used), pct, len(s.Members))
	if s.DeviceBytes > 0 {
		fmt.Fprintf(out, "   device %s", size(s.DeviceBytes))
	}
	fmt.Fprintln(out)
	for _, r := range s.Reaped {
		fmt.Fprintf(out, "reaped %s (its process died)\n", r)
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "MEMBER\tPID\tMAPPED\tSEQS\tLIVE BLOCKS\tCACHED\tHIT RATE\tPAGE OVERHEAD\tCOMPACT\t")
	for _, m := range s.Members {
		compact := "no"
		if m.AllowCompact {
			compact = "yes"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%.1f%%\t%.3f\t%s\t\n", m.Name, m.PID, size(m.Mapped), m.Usage.Sequences,
			m.Usage.LiveBlocks, m.Usage.CachedBlocks, 100*m.Usage.HitRate(), m.Usage.PageOverhead, compact)
	}
	return tw.Flush()
}

// top redraws the list every interval, n times or until done.
func top(l *ledger.Ledger, out io.Writer, n int, every time.Duration, done <-chan struct{}) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for frame := 0; n == 0 || frame < n; frame++ {
		if frame > 0 {
			select {
			case <-done:
				return nil
			case <-t.C:
			}
		}
		s, err := l.Snapshot()
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "\x1b[H\x1b[2Jpagedkvctl top   %s   %s   every %v\n\n", l.Path(), time.Now().Format("15:04:05"), every)
		if err := writeList(out, s); err != nil {
			return err
		}
	}
	return nil
}
