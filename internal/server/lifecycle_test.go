package server

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A SIGHUP while Run drains its requests at shutdown (logrotate and
// "systemctl reload" send one at any time) is ignored: the process lives,
// the request in flight ends, and Run returns. A child test process
// serves, so that a SIGHUP taking its default action kills the child, not
// this test binary.
func TestSIGHUPDuringDrainKeepsTheProcess(t *testing.T) {
	if os.Getenv("KEYVAULT_TEST_SIGHUP_CHILD") == "1" {
		sighupDuringDrain(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSIGHUPDuringDrainKeepsTheProcess$", "-test.v")
	cmd.Env = append(os.Environ(), "KEYVAULT_TEST_SIGHUP_CHILD=1")
	out, err := cmd.CombinedOutput()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		t.Fatalf("the serving process was killed by %v while it drained:\n%s", ws.Signal(), out)
	}
	if err != nil || !strings.Contains(string(out), "drained after SIGHUP") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func sighupDuringDrain(t *testing.T) {
	r := newKit(t, "server-sighup-drain").start(t)
	if r.api == "" {
		t.Fatalf("not served: %v\n%s", <-r.done, r.log)
	}
	// A request in flight: its headers sent, its body still to come.
	c, err := net.Dial("tcp", r.api)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "PUT /v1/backups/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client-token\r\n"+
		"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pin\":")
	time.Sleep(200 * time.Millisecond)
	r.stop()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-r.done:
		t.Fatalf("Run returned (%v) with a request in flight: nothing drained", err)
	default:
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	c.Close() // the request ends, unfinished, and so does the drain
	select {
	case err := <-r.done:
		r.done <- err
		fmt.Println("drained after SIGHUP; Run:", err)
	case <-time.After(25 * time.Second):
		t.Fatalf("Run did not return once its last request ended:\n%s", r.log)
	}
}

// An API request's work ends before its connection's write deadline, so a
// counted guess is answered: at most 25 s, and well under a shorter write
// timeout.
func TestRequestTimeoutEndsBeforeTheWriteDeadline(t *testing.T) {
	for write, want := range map[time.Duration]time.Duration{
		30 * time.Second: 25 * time.Second, // the default
		2 * time.Minute:  25 * time.Second,
		12 * time.Second: 10 * time.Second,
		time.Second:      time.Second * 5 / 6,
	} {
		if got := requestTimeout(write); got != want || got >= write {
			t.Errorf("write timeout %v: request timeout %v, want %v", write, got, want)
		}
	}
}
