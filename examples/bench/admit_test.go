package main

import (
	"log"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/workload/admit"
	"github.com/pagedkv/pagedkv/vmm"
)

// TestMain lets the test binary be a model's process of the cross-process admission run, as
// the bench program is.
func TestMain(m *testing.M) {
	if spec := os.Getenv(admitChildEnv); spec != "" {
		if err := admitChild(spec); err != nil {
			log.Fatal(err)
		}
		os.Exit(0)
	}
	if child, err := hotChild(); child {
		if err != nil {
			log.Fatal(err)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// Three processes on one ledger admit the trace's requests as one SharedPool does: all of them,
// with a queueing delay far below static thirds'.
func TestAdmitAcrossProcesses(t *testing.T) {
	o := admit.Default()
	o.Steps = 900
	cfg, limit := admitConfig()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	defer dev.Close()
	static, err := admit.RunShares(dev, cfg, limit, o)
	require.NoError(t, err)
	res, err := admitAcrossProcesses(o, limit)
	require.NoError(t, err)
	t.Logf("static thirds: %+v", static)
	t.Logf("three processes, one ledger: %+v", res)
	require.Positive(t, res.Admitted)
	require.Zero(t, res.Waiting, "every request was admitted")
	require.Less(t, res.Mean*5, static.Mean, "queueing far below static thirds'")
}
