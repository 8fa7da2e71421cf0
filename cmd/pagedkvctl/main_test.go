package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) {
	proctest.Main(map[string]proctest.Role{"serve": serve})
	os.Exit(m.Run())
}

const page = 2 << 20

// serve is a serving process: joined to the ledger at args[0] as model args[1] on the host
// backend, it holds args[2] pages of live sequences, one page of idle prefix-cached blocks and
// a reserve of args[3] free pages, says "ready", then answers "grow" (append whole pages until
// the limit refuses) and "mapped" until stdin ends.
func serve(args []string, in *bufio.Scanner, out io.Writer) error {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	if err != nil {
		return err
	}
	defer dev.Close()
	l, err := ledger.Open(args[0], ledger.Options{RequestTimeout: hang}) // the other always answers in time
	if err != nil {
		return err
	}
	defer l.Close()
	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
	if err != nil {
		return err
	}
	defer pool.Close()
	live, _ := strconv.Atoi(args[2])
	reserve, _ := strconv.Atoi(args[3])
	m, err := pool.Register(args[1], kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: page, Capacity: 64 * page, NoBackground: true, ReservePages: reserve})
	if err != nil {
		return err
	}
	next := kvcache.SeqID(0)
	grow := func() error {
		for ; ; next++ {
			if _, err := m.AppendTokens(next, 1024, nil); err != nil { // 64 blocks: one page
				return err
			}
			if int(next)+1 == live {
				next++
				return nil
			}
		}
	}
	if err := grow(); err != nil {
		return err
	}
	prompt := make([]kvcache.TokenID, 64)
	for i := range prompt {
		prompt[i] = kvcache.TokenID(i + 1)
	}
	if _, err := m.StartSequence(9999, kvcache.Prompt{Tokens: prompt}); err != nil {
		return err
	}
	if _, err := m.AppendTokenIDs(9999, prompt, nil); err != nil {
		return err
	}
	if err := m.FreeSequence(9999); err != nil { // its 4 blocks stay cached, idle
		return err
	}
	if err := m.Settle(); err != nil {
		return err
	}
	fmt.Fprintln(out, "ready")
	for in.Scan() {
		switch in.Text() {
		case "grow":
			live = 1 << 20
			fmt.Fprintln(out, "grown", grow())
		case "mapped":
			fmt.Fprintln(out, "mapped", m.Stats().MappedBytes)
		}
	}
	return nil
}

// hang is how long a test waits for what must happen (a child's answer, a member's reply to a
// request, a published usage) before it fails: a guard against a hang, long enough that a
// loaded machine never reaches it.
const hang = time.Minute

// ctl runs pagedkvctl on the ledger at path, waiting up to hang for each member's answer.
func ctl(t *testing.T, path string, args ...string) string {
	t.Helper()
	var out bytes.Buffer
	require.NoError(t, run(append([]string{"-ledger", path, "-timeout", hang.String()}, args...), &out, nil), "pagedkvctl %v", args)
	return out.String()
}

func list(t *testing.T, path string) listOut {
	t.Helper()
	var o listOut
	require.NoError(t, json.Unmarshal([]byte(ctl(t, path, "-json", "list")), &o))
	return o
}

func member(o listOut, name string) memberJSON {
	for _, m := range o.Members {
		if m.Name == name {
			return m
		}
	}
	return memberJSON{}
}

// Two serving processes under one ledger, steered by pagedkvctl: list shows both, drop-cache
// empties one's prefix cache, a lowered limit takes their free pages back and binds both when
// they grow again, top redraws.
func TestTwoServingProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ledger")
	l, err := ledger.Open(path, ledger.Options{Limit: 32 * page, DeviceBytes: 128 << 20})
	require.NoError(t, err)
	defer l.Close()
	a := proctest.Start(t, "serve", path, "llama", "5", "3")
	b := proctest.Start(t, "serve", path, "qwen", "5", "3")
	a.Expect("ready", hang)
	b.Expect("ready", hang)

	var o listOut
	require.Eventually(t, func() bool { // usage is published every half second
		o = list(t, path)
		settled := func(name string) bool { // the 4 cached blocks idle: published after the child's free
			m := member(o, name)
			return m.CachedBlocks == 4 && m.LiveBlocks == 5*64
		}
		return settled("llama") && settled("qwen")
	}, hang, 10*time.Millisecond)
	require.Len(t, o.Members, 2)
	require.Equal(t, uint64(32*page), o.LimitBytes)
	for _, name := range []string{"llama", "qwen"} {
		m := member(o, name)
		require.Greater(t, m.MappedBytes, uint64(6*page), "%s: 5 live pages, 1 page of cached blocks, a reserve", name)
		require.Equal(t, 5*64, m.LiveBlocks)
		require.NotZero(t, m.PID)
	}
	text := ctl(t, path, "list")
	require.Contains(t, text, fmt.Sprintf("limit 64.0 MiB   used %.1f MiB (%.0f%%)   members 2   device 128.0 MiB",
		float64(o.UsedBytes)/(1<<20), 100*float64(o.UsedBytes)/float64(64<<20)))
	require.Contains(t, text, "llama")

	require.Contains(t, ctl(t, path, "drop-cache", "llama"), "asked 1 member")
	require.Eventually(t, func() bool { return member(list(t, path), "llama").CachedBlocks == 0 }, hang, 10*time.Millisecond)
	require.Equal(t, 4, member(list(t, path), "qwen").CachedBlocks, "only llama was asked")

	require.Contains(t, ctl(t, path, "limit", "24M"), "limit 24.0 MiB, used")
	o = list(t, path)
	require.Equal(t, uint64(24<<20), o.LimitBytes)
	require.LessOrEqual(t, o.UsedBytes, uint64(24<<20), "both gave back their free and cached pages")
	a.Send("grow")
	b.Send("grow")
	require.Contains(t, a.Expect("grown ", hang), "out of memory")
	require.Contains(t, b.Expect("grown ", hang), "out of memory")
	a.Send("mapped")
	b.Send("mapped")
	ma, err := strconv.ParseUint(a.Expect("mapped ", hang), 10, 64)
	require.NoError(t, err)
	mb, err := strconv.ParseUint(b.Expect("mapped ", hang), 10, 64)
	require.NoError(t, err)
	t.Logf("after the limit fell to 24 MiB and both grew: llama %d MiB, qwen %d MiB", ma>>20, mb>>20)
	require.Equal(t, uint64(24<<20), ma+mb, "together they fill the new limit, and no more")
	require.GreaterOrEqual(t, min(ma, mb), uint64(5*page), "each keeps its live pages")

	var r ledger.LimitReport
	var out bytes.Buffer
	require.NoError(t, run([]string{"-ledger", path, "-json", "-timeout", hang.String(), "limit", "50%"}, &out, nil))
	require.NoError(t, json.Unmarshal(out.Bytes(), &r))
	require.Equal(t, uint64(64<<20), r.Limit)

	screen := ctl(t, path, "top", "-n", "2", "-i", "10ms")
	require.Equal(t, 2, strings.Count(screen, "\x1b[H\x1b[2J"), "two frames")
	require.Contains(t, screen, "qwen")
	require.Contains(t, screen, "PAGE OVERHEAD")

	a.Close()
	b.Close()
	require.Empty(t, list(t, path).Members)
	require.NoError(t, l.Check())
}

func TestBadInput(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ledger")
	var out bytes.Buffer
	err := run([]string{"-ledger", path, "list"}, &out, nil)
	require.ErrorIs(t, err, ledger.ErrNotFound, "pagedkvctl never creates a ledger")
	_, statErr := os.Stat(path)
	require.True(t, os.IsNotExist(statErr))
	// A command line that is wrong whatever the ledger holds says so, not that the ledger is missing.
	for _, args := range [][]string{{}, {"lsit"}, {"limit"}, {"limit", "1G", "2G"}, {"top", "-n", "-1"}, {"top", "-i", "0s"},
		{"top", "-x"}, {"top", "5"}, {"top", "-n", "1", "extra"}, {"list", "llama"}, {"drop-cache", "a", "b"}, {"drop-cache", ""}, {"-nosuchflag", "list"}, {"-timeout", "0s", "list"}} {
		err := run(append([]string{"-ledger", path}, args...), &out, nil)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.Equal(t, 2, exitCode(err), "%v: a usage error exits 2", args)
	}
	require.Equal(t, 1, exitCode(err), "a missing ledger exits 1")
	l, err := ledger.Open(path, ledger.Options{Limit: 1 << 30})
	require.NoError(t, err)
	defer l.Close()
	for _, args := range [][]string{{}, {"frobnicate"}, {"limit"}, {"limit", "0"}, {"limit", "-5G"}, {"limit", "12X"},
		{"limit", "18446744073709551615T"}, {"limit", "50%"}, {"limit", "101%"}, {"limit", "NaN%"}, {"top", "-i", "0s"}, {"drop-cache", "a", "b"},
		{"drop-cache", "nobody"}, {"-nosuchflag", "list"}, {"-timeout", "0s", "list"}, {"-timeout", "-1s", "list"}} {
		err := run(append([]string{"-ledger", path}, args...), &out, nil)
		require.Error(t, err, "%v", args)
	}
	require.Equal(t, uint64(1<<30), l.Limit(), "no refused command changed the limit")
}

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]uint64{"1073741824": 1 << 30, "512K": 512 << 10, "512m": 512 << 20, "40G": 40 << 30, "1T": 1 << 40, "25%": 1 << 30, "100%": 4 << 30} {
		got, err := parseLimit(in, 4<<30)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	// Near 2^64 the device's size rounds up to 2^64 as a float, whose conversion back to uint64 is
	// undefined (2^63 on amd64): a share of it must still come out right.
	for in, want := range map[string]uint64{"100%": math.MaxUint64, "50%": 1 << 63} {
		got, err := parseLimit(in, math.MaxUint64)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
}

// FuzzParseLimit: any string either parses to a positive size that fits in uint64 (a plain
// integer to itself, a suffixed one to its multiple, a percentage to at most the device) or is
// refused; nothing panics or wraps.
func FuzzParseLimit(f *testing.F) {
	for _, s := range []string{"1", "40G", "512m", "50%", "100%", "0", "-1", "18446744073709551615", "16777216T", "1e3%", "%", "G", "", "NaN%", "nan%", "Inf%", "1e-300%", "0x1p-2%"} {
		f.Add(s, uint64(4<<30))
	}
	f.Fuzz(func(t *testing.T, s string, device uint64) {
		v, err := parseLimit(s, device)
		if err != nil {
			return
		}
		require.Positive(t, v, "%q", s)
		if strings.HasSuffix(s, "%") {
			require.LessOrEqual(t, v, device, "%q of %d", s, device)
			return
		}
		if n, err := strconv.ParseUint(s, 10, 64); err == nil {
			require.Equal(t, n, v, "%q", s)
			return
		}
		unit := map[byte]uint64{'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}[s[len(s)-1]&^0x20]
		require.NotZero(t, unit, "%q parsed without a known suffix", s)
		require.Zero(t, v%unit, "%q", s)
	})
}
