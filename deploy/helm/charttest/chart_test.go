package charttest

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

const (
	chartDir  = "../keyvault"
	repoRoot  = "../../.."
	rulesFile = "../../prometheus/keyvault-rules.yaml"
	kitDir    = "../../kubernetes"
)

// secretKeys are the keys each Secret the chart mounts holds, as
// deploy/README.md tells the operator to create them.
var secretKeys = map[string][]string{
	"keyvault-tls":         {"tls.crt", "tls.key", "ca.crt"},
	"keyvault-hsm":         {"hsm-a-pin", "hsm-b-pin"},
	"keyvault-etcd-client": {"ca.crt", "tls.crt", "tls.key"},
}

// imageFiles are what the image holds: the PKCS#11 module the values name
// and the directory the Dockerfile creates.
var (
	imageFiles = []string{"/usr/lib/pkcs11/vendor-pkcs11.so"}
	imageDirs  = []string{"/var/lib/keyvault", "/etc/keyvault", "/tmp"}
)

func monitoringOn() map[string]any {
	return map[string]any{"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true}}
}

// TestChart lints and renders both modes, with the defaults and with every
// optional object on, decodes every manifest strictly into the Kubernetes
// API types, and checks the objects against each other and the keyvault
// config they carry, which must pass `keyvault config check`.
func TestChart(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		vals  map[string]any
		kinds []string
	}{
		{"bbolt", map[string]any{"mode": "bbolt", "keysInit": map[string]any{"enabled": true}, "monitoring": monitoringOn()},
			[]string{"ConfigMap", "Job", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service", "Service", "ServiceMonitor", "StatefulSet"}},
		{"etcd", map[string]any{"mode": "etcd", "keysInit": map[string]any{"enabled": true}, "monitoring": monitoringOn()},
			[]string{"ConfigMap", "Deployment", "Job", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service", "Service", "ServiceMonitor"}},
		{"bbolt defaults", nil,
			[]string{"ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "StatefulSet"}},
		{"etcd defaults", map[string]any{"mode": "etcd"},
			[]string{"ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service"}},
		{"bbolt admin token", map[string]any{
			"adminTLS":   map[string]any{"enabled": true},
			"config":     map[string]any{"admin_token_sha256": "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918"},
			"monitoring": map[string]any{"serviceMonitor": map[string]any{"enabled": true, "tlsConfig": map[string]any{"serverName": "keyvault-metrics.keyvault.svc", "ca": map[string]any{"secret": map[string]any{"name": "keyvault-admin-ca", "key": "ca.crt"}}}}},
		}, []string{"ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "ServiceMonitor", "StatefulSet"}},
		{"etcd admin mTLS", map[string]any{"mode": "etcd", "adminTLS": map[string]any{"enabled": true, "clientCA": true}},
			[]string{"ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			helmLint(t, tc.vals)
			files, err := Render(chartDir, tc.vals)
			if err != nil {
				t.Fatal(err)
			}
			ms, err := Decode(files)
			if err != nil {
				t.Fatalf("strict decoding into the API types:\n%v", err)
			}
			var kinds, names []string
			for _, m := range ms {
				kinds = append(kinds, m.Kind)
				names = append(names, m.Kind+" "+m.Name)
			}
			slices.Sort(kinds)
			if !slices.Equal(kinds, tc.kinds) {
				t.Fatalf("rendered kinds %q, want %q", kinds, tc.kinds)
			}
			mode := "bbolt"
			if m, ok := tc.vals["mode"]; ok {
				mode = m.(string)
			}
			checkObjects(t, mode, ms)
			t.Logf("helm template: %d manifests decoded strictly: %s", len(ms), strings.Join(names, ", "))
		})
	}
}

// helmLint runs the SDK's `helm lint --strict`: warnings fail too.
func helmLint(t *testing.T, vals map[string]any) {
	t.Helper()
	res := lint.RunAll(chartDir, vals, Namespace)
	var infos []string
	for _, m := range res.Messages {
		if m.Severity >= support.WarningSev {
			t.Errorf("helm lint: %v", m)
		} else {
			infos = append(infos, m.Error())
		}
	}
	t.Logf("helm lint: %d errors or warnings; %q", len(res.Messages)-len(infos), infos)
}

// objects are the decoded manifests of one render, by kind.
type objects struct {
	cm       *corev1.ConfigMap
	pod      *corev1.PodTemplateSpec
	podSel   map[string]string
	sts      *appsv1.StatefulSet
	dep      *appsv1.Deployment
	job      *batchv1.Job
	api, mon *corev1.Service
	pdb      *policyv1.PodDisruptionBudget
	np       *networkingv1.NetworkPolicy
	sm       *monitoringv1.ServiceMonitor
	pr       *monitoringv1.PrometheusRule
}

func collect(t *testing.T, ms []Manifest) objects {
	t.Helper()
	var o objects
	for _, m := range ms {
		switch x := m.Object.(type) {
		case *corev1.ConfigMap:
			o.cm = x
		case *appsv1.StatefulSet:
			o.sts, o.pod, o.podSel = x, &x.Spec.Template, x.Spec.Selector.MatchLabels
		case *appsv1.Deployment:
			o.dep, o.pod, o.podSel = x, &x.Spec.Template, x.Spec.Selector.MatchLabels
		case *batchv1.Job:
			o.job = x
		case *corev1.Service:
			if strings.HasSuffix(x.Name, "-metrics") {
				o.mon = x
			} else {
				o.api = x
			}
		case *policyv1.PodDisruptionBudget:
			o.pdb = x
		case *networkingv1.NetworkPolicy:
			o.np = x
		case *monitoringv1.ServiceMonitor:
			o.sm = x
		case *monitoringv1.PrometheusRule:
			o.pr = x
		}
	}
	if o.cm == nil || o.pod == nil || o.api == nil || o.mon == nil || o.pdb == nil {
		t.Fatalf("missing objects: %+v", o)
	}
	return o
}

// subset reports whether sel is non-empty and each of its labels is in
// labels with its value.
func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return len(sel) > 0
}

// kvConfig is the part of the keyvault config the checks read.
type kvConfig struct {
	Listen      string            `json:"listen"`
	AdminListen string            `json:"admin_listen"`
	AdminToken  string            `json:"admin_token_sha256"`
	AdminTLS    map[string]string `json:"admin_tls"`
	TLS         *struct {
		CertFile string `json:"cert_file"`
		KeyFile  string `json:"key_file"`
	} `json:"tls"`
	Store struct {
		Driver         string `json:"driver"`
		Path           string `json:"path"`
		RollbackAnchor *bool  `json:"rollback_anchor"`
		Etcd           *struct {
			Endpoints []string          `json:"endpoints"`
			TLS       map[string]string `json:"tls"`
		} `json:"etcd"`
	} `json:"store"`
	HSM struct {
		Members []struct {
			Name    string `json:"name"`
			PinFile string `json:"pin_file"`
			PinEnv  string `json:"pin_env"`
		} `json:"members"`
	} `json:"hsm"`
}

func checkObjects(t *testing.T, mode string, ms []Manifest) {
	o := collect(t, ms)
	text := o.cm.Data["keyvault.yaml"]
	var cfg kvConfig
	if err := yaml.Unmarshal([]byte(text), &cfg); err != nil {
		t.Fatalf("ConfigMap keyvault.yaml: %v", err)
	}
	pod := o.pod

	// The workload of the mode, with the store where it belongs.
	switch mode {
	case "bbolt":
		if o.sts == nil || o.dep != nil || o.sts.Spec.Replicas == nil || *o.sts.Spec.Replicas != 1 {
			t.Fatalf("mode bbolt: want a StatefulSet of 1 replica and no Deployment")
		}
		if cfg.Store.Driver != "bolt" || cfg.Store.RollbackAnchor == nil || !*cfg.Store.RollbackAnchor {
			t.Errorf("mode bbolt: store %+v, want driver bolt with rollback_anchor: true", cfg.Store)
		}
		if o.sts.Spec.ServiceName != o.api.Name {
			t.Errorf("StatefulSet serviceName %q, want the API Service %q", o.sts.Spec.ServiceName, o.api.Name)
		}
		if len(o.sts.Spec.VolumeClaimTemplates) != 1 || mountOf(pod, path.Dir(cfg.Store.Path)) != o.sts.Spec.VolumeClaimTemplates[0].Name {
			t.Errorf("store.path %s is not on the volume claim", cfg.Store.Path)
		}
	case "etcd":
		if o.dep == nil || o.sts != nil || o.dep.Spec.Replicas == nil || *o.dep.Spec.Replicas < 2 {
			t.Fatalf("mode etcd: want a Deployment of several replicas and no StatefulSet")
		}
		if cfg.Store.Driver != "etcd" || cfg.Store.Etcd == nil || len(cfg.Store.Etcd.Endpoints) == 0 || cfg.Store.Path != "" {
			t.Fatalf("mode etcd: store %+v", cfg.Store)
		}
		for _, e := range cfg.Store.Etcd.Endpoints {
			if !strings.HasPrefix(e, "https://") {
				t.Errorf("etcd endpoint %q is not https://", e)
			}
		}
		for k, f := range cfg.Store.Etcd.TLS {
			if v := secretOf(pod, path.Dir(f)); v != "keyvault-etcd-client" {
				t.Errorf("store.etcd.tls.%s %s is not on the etcd client Secret's mount (%q)", k, f, v)
			}
		}
		if len(cfg.Store.Etcd.TLS) != 3 {
			t.Errorf("store.etcd.tls %v: want ca_file, cert_file, key_file", cfg.Store.Etcd.TLS)
		}
	}

	// Selectors.
	if !subset(o.podSel, pod.Labels) {
		t.Errorf("workload selector %v does not match its pod labels %v", o.podSel, pod.Labels)
	}
	for _, svc := range []*corev1.Service{o.api, o.mon} {
		if !subset(svc.Spec.Selector, pod.Labels) {
			t.Errorf("Service %s selector %v does not match the pod labels", svc.Name, svc.Spec.Selector)
		}
	}
	if !subset(o.pdb.Spec.Selector.MatchLabels, pod.Labels) || o.pdb.Spec.MaxUnavailable == nil {
		t.Errorf("PodDisruptionBudget %+v: want maxUnavailable and a selector of the pods", o.pdb.Spec)
	} else if want := map[string]int{"bbolt": 0, "etcd": 1}[mode]; o.pdb.Spec.MaxUnavailable.IntValue() != want {
		t.Errorf("mode %s: PodDisruptionBudget maxUnavailable %v, want %d", mode, o.pdb.Spec.MaxUnavailable, want)
	}

	// Ports: the config's listeners, the container's named ports, the
	// Services (api on one, admin on the other), the probes.
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	for name, addr := range map[string]string{"api": cfg.Listen, "admin": cfg.AdminListen} {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("config address %q: %v", addr, err)
		}
		i := slices.IndexFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == name })
		if i < 0 || strconv.Itoa(int(c.Ports[i].ContainerPort)) != port {
			t.Errorf("container port %s does not match the config's %s", name, addr)
		}
	}
	for svc, name := range map[*corev1.Service]string{o.api: "api", o.mon: "admin"} {
		if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != name || svc.Spec.Ports[0].TargetPort.String() != name {
			t.Errorf("Service %s ports %+v, want only %s", svc.Name, svc.Spec.Ports, name)
		}
	}
	// The probes speak the admin listener's protocol: HTTP, HTTPS with
	// admin_tls, a TCP connection when it wants client certificates.
	scheme := corev1.URISchemeHTTP
	if cfg.AdminTLS != nil {
		scheme = corev1.URISchemeHTTPS
		for k, f := range cfg.AdminTLS {
			if secretOf(pod, path.Dir(f)) != "keyvault-tls" {
				t.Errorf("admin_tls.%s %s is not on the TLS Secret's mount", k, f)
			}
		}
	}
	if cfg.AdminToken != "" && cfg.AdminTLS == nil {
		t.Errorf("admin_token_sha256 without admin_tls: the token would cross the admin port in clear")
	}
	for what, p := range map[string]struct {
		probe *corev1.Probe
		path  string
	}{"startup": {c.StartupProbe, "/healthz"}, "liveness": {c.LivenessProbe, "/healthz"}, "readiness": {c.ReadinessProbe, "/readyz"}} {
		switch {
		case p.probe == nil:
			t.Errorf("no %s probe", what)
		case cfg.AdminTLS["client_ca_file"] != "":
			if p.probe.TCPSocket == nil || p.probe.TCPSocket.Port.String() != "admin" {
				t.Errorf("%s probe %+v: with admin client certificates, want a TCP probe of port admin", what, p.probe)
			}
		case p.probe.HTTPGet == nil || p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.String() != "admin" || p.probe.HTTPGet.Scheme != scheme && !(scheme == corev1.URISchemeHTTP && p.probe.HTTPGet.Scheme == ""):
			t.Errorf("%s probe %+v: want %s GET %s on port admin", what, p.probe, scheme, p.path)
		}
	}
	if !slices.Equal(c.Args, []string{"serve", "--config", "/etc/keyvault/keyvault.yaml"}) || mountOf(pod, "/etc/keyvault/keyvault.yaml") != "config" {
		t.Errorf("container args %q, mounts %+v: want serve --config of the mounted ConfigMap", c.Args, c.VolumeMounts)
	}

	// PINs and API TLS from Secrets, as files on their mounts.
	for _, m := range cfg.HSM.Members {
		if m.PinEnv != "" || m.PinFile == "" || secretOf(pod, path.Dir(m.PinFile)) != "keyvault-hsm" {
			t.Errorf("hsm member %s: pin_file %q pin_env %q, want a pin_file on the PIN Secret's mount", m.Name, m.PinFile, m.PinEnv)
		}
	}
	if cfg.TLS == nil || secretOf(pod, path.Dir(cfg.TLS.CertFile)) != "keyvault-tls" || secretOf(pod, path.Dir(cfg.TLS.KeyFile)) != "keyvault-tls" {
		t.Errorf("tls %+v: want the files on the TLS Secret's mount", cfg.TLS)
	}

	checkHardening(t, "server", &pod.Spec)
	if o.job != nil {
		checkHardening(t, "keys-init Job", &o.job.Spec.Template.Spec)
		if c := o.job.Spec.Template.Spec.Containers; len(c) != 1 || !slices.Equal(c[0].Args, []string{"keys", "init", "--config", "/etc/keyvault/keyvault.yaml"}) {
			t.Errorf("keys-init Job containers %+v", c)
		}
	}
	checkNetworkPolicy(t, o.np, pod.Labels)
	if o.sm != nil {
		checkServiceMonitor(t, o.sm, o.mon)
		if want := map[bool]string{false: "http", true: "https"}[cfg.AdminTLS != nil]; len(o.sm.Spec.Endpoints) == 1 && o.sm.Spec.Endpoints[0].Scheme != nil && string(*o.sm.Spec.Endpoints[0].Scheme) != want {
			t.Errorf("ServiceMonitor scheme %v, want %s", *o.sm.Spec.Endpoints[0].Scheme, want)
		}
	}
	if o.pr != nil {
		checkRules(t, o.pr)
	}

	// keyvault's own validation, with the files the pod's mounts hold.
	configCheck(t, text, &pod.Spec)
	if o.job != nil {
		configCheck(t, text, &o.job.Spec.Template.Spec)
	}
}

// mountOf returns the volume mounted at dir in the first container.
func mountOf(pod *corev1.PodTemplateSpec, dir string) string {
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		if m.MountPath == dir {
			return m.Name
		}
	}
	return ""
}

// secretOf returns the Secret mounted at dir in the first container.
func secretOf(pod *corev1.PodTemplateSpec, dir string) string {
	name := mountOf(pod, dir)
	for _, v := range pod.Spec.Volumes {
		if v.Name == name && v.Secret != nil {
			return v.Secret.SecretName
		}
	}
	return ""
}

func checkHardening(t *testing.T, where string, ps *corev1.PodSpec) {
	t.Helper()
	psc := ps.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 ||
		psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod securityContext %+v: want non-root, a non-zero uid, seccomp RuntimeDefault", where, psc)
	}
	if ps.AutomountServiceAccountToken == nil || *ps.AutomountServiceAccountToken {
		t.Errorf("%s: the service account token is mounted", where)
	}
	for _, c := range ps.Containers {
		sc := c.SecurityContext
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
			t.Errorf("%s container %s securityContext %+v: want a read-only root, no privilege escalation, drop ALL", where, c.Name, sc)
		}
	}
}

// checkNetworkPolicy: the policy selects the pods' ingress, lets the API in
// and the admin port only from Prometheus in the monitoring namespace.
func checkNetworkPolicy(t *testing.T, np *networkingv1.NetworkPolicy, podLabels map[string]string) {
	t.Helper()
	if np == nil || !subset(np.Spec.PodSelector.MatchLabels, podLabels) || !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
		t.Fatalf("NetworkPolicy %+v: want one on the pods' ingress", np)
	}
	allowed := map[string]bool{}
	for _, rule := range np.Spec.Ingress {
		for _, p := range rule.Ports {
			port := p.Port.String()
			allowed[port] = true
			if port != "admin" {
				continue
			}
			ok := len(rule.From) > 0
			for _, f := range rule.From {
				ok = ok && f.NamespaceSelector != nil && f.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] == "monitoring" &&
					f.PodSelector != nil && f.PodSelector.MatchLabels["app.kubernetes.io/name"] == "prometheus" && f.IPBlock == nil
			}
			if !ok {
				t.Errorf("NetworkPolicy lets %+v reach the admin port: want only Prometheus pods in namespace monitoring", rule.From)
			}
		}
	}
	if len(allowed) != 2 || !allowed["api"] || !allowed["admin"] {
		t.Errorf("NetworkPolicy ports %v, want api and admin", allowed)
	}
}

// checkServiceMonitor: it scrapes the metrics Service's admin /metrics as
// the job "keyvault", which the alert rules select.
func checkServiceMonitor(t *testing.T, sm *monitoringv1.ServiceMonitor, mon *corev1.Service) {
	t.Helper()
	if !subset(sm.Spec.Selector.MatchLabels, mon.Labels) {
		t.Errorf("ServiceMonitor selector %v does not match the metrics Service %v", sm.Spec.Selector.MatchLabels, mon.Labels)
	}
	if job := mon.Labels[sm.Spec.JobLabel]; sm.Spec.JobLabel == "" || job != "keyvault" {
		t.Errorf("ServiceMonitor jobLabel %q gives the job %q, want keyvault (the alert rules select job=\"keyvault\")", sm.Spec.JobLabel, job)
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "admin" || sm.Spec.Endpoints[0].Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %+v, want port admin, path /metrics", sm.Spec.Endpoints)
	}
}

// jsonValue turns v into plain JSON values, to compare documents.
func jsonValue(t *testing.T, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkRules: the PrometheusRule's groups are those of the rules file.
func checkRules(t *testing.T, pr *monitoringv1.PrometheusRule) {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups any `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(b, &rules); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	if got, want := jsonValue(t, pr.Spec.Groups), jsonValue(t, rules.Groups); !reflect.DeepEqual(got, want) {
		t.Errorf("PrometheusRule groups differ from %s: run deploy/helm/generate.sh", rulesFile)
	}
	n := 0
	for _, g := range pr.Spec.Groups {
		n += len(g.Rules)
	}
	t.Logf("PrometheusRule: %d groups, %d rules, the same as %s", len(pr.Spec.Groups), n, rulesFile)
}

// TestMain removes the keyvault binary built when bin/keyvault is missing.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var (
	binDir  string
	binOnce sync.Once
	binPath string
	binErr  error
)

// keyvaultBin is the binary make test builds first (bin/keyvault), or one
// built here when it is missing.
func keyvaultBin(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		p, err := filepath.Abs(filepath.Join(repoRoot, "bin", "keyvault"))
		if err != nil {
			binErr = err
			return
		}
		if _, err := os.Stat(p); err == nil {
			binPath = p
			return
		}
		binDir, binErr = os.MkdirTemp("", "charttest-bin")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "keyvault")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/keyvault")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = &buildError{err, out}
		}
	})
	if binErr != nil {
		t.Fatalf("build keyvault: %v", binErr)
	}
	return binPath
}

type buildError struct {
	err error
	out []byte
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + string(e.out) }

// pathKeys are the config keys that name files or directories.
var pathKeys = map[string]bool{"cert_file": true, "key_file": true, "client_ca_file": true, "ca_file": true, "pin_file": true, "module": true, "path": true}

// reroot prefixes with root every path the config names.
func reroot(v any, root string) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if s, ok := e.(string); ok && pathKeys[k] && strings.HasPrefix(s, "/") {
				x[k] = filepath.Join(root, s)
			} else {
				x[k] = reroot(e, root)
			}
		}
	case []any:
		for i, e := range x {
			x[i] = reroot(e, root)
		}
	}
	return v
}

// configCheck runs `keyvault config check` on the config in a directory
// that holds what the pod would see: the image's files and directories, the
// keys of each Secret at its mount, the directories of the other volumes.
// The config's paths are moved under that directory.
func configCheck(t *testing.T, text string, ps *corev1.PodSpec) {
	t.Helper()
	root := t.TempDir()
	mk := func(p string, dir bool) {
		full := filepath.Join(root, p)
		if dir {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			return
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte("1234\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range imageDirs {
		mk(d, true)
	}
	for _, f := range imageFiles {
		mk(f, false)
	}
	vols := map[string]corev1.Volume{}
	for _, v := range ps.Volumes {
		vols[v.Name] = v
	}
	for _, m := range ps.Containers[0].VolumeMounts {
		v := vols[m.Name]
		switch {
		case v.Secret != nil:
			keys, ok := secretKeys[v.Secret.SecretName]
			if !ok {
				t.Fatalf("volume %s: Secret %q, not one the docs have the operator create", m.Name, v.Secret.SecretName)
			}
			for _, k := range keys {
				mk(path.Join(m.MountPath, k), false)
			}
		case m.SubPath != "":
		default:
			mk(m.MountPath, true)
		}
	}
	var doc any
	if err := yaml.Unmarshal([]byte(text), &doc); err != nil {
		t.Fatal(err)
	}
	out, err := yaml.Marshal(reroot(doc, root))
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(root, "keyvault.yaml")
	if err := os.WriteFile(file, out, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(keyvaultBin(t), "config", "check", "--config", file)
	res, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("keyvault config check of the ConfigMap's keyvault.yaml (paths under %s): %v\n%s", root, err, res)
	}
	t.Logf("keyvault config check: %s", bytes.TrimSpace(bytes.ReplaceAll(res, []byte(root), []byte("<pod>"))))
}

// TestChartRefuses shows the checks fail: values the chart must refuse,
// and a manifest with an unknown field that strict decoding rejects.
func TestChartRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		vals map[string]any
		want string
	}{
		{"plain http etcd", map[string]any{"mode": "etcd", "etcd": map[string]any{"endpoints": []any{"http://etcd-0.etcd:2379"}}}, `"http://etcd-0.etcd:2379" is not https://`},
		{"no etcd endpoints", map[string]any{"mode": "etcd", "etcd": map[string]any{"endpoints": []any{}}}, "etcd.endpoints: at least one"},
		{"unknown mode", map[string]any{"mode": "sqlite"}, `mode "sqlite": want bbolt or etcd`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Render(chartDir, tc.vals); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("render: %v, want an error with %q", err, tc.want)
			}
		})
	}

	// A misspelt field in values reaches a manifest; strict decoding refuses it.
	files, err := Render(chartDir, map[string]any{"podSecurityContext": map[string]any{"runAsUsr": 10001}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(files); err == nil || !strings.Contains(err.Error(), `unknown field "runAsUsr"`) {
		t.Errorf("decoding a StatefulSet with securityContext.runAsUsr: %v, want an unknown field error", err)
	} else {
		t.Logf("refused as it should be: %v", err)
	}
	// The same for the Prometheus Operator types.
	files, err = Render(chartDir, map[string]any{"monitoring": monitoringOn()})
	if err != nil {
		t.Fatal(err)
	}
	files["templates/servicemonitor.yaml"] = strings.Replace(files["templates/servicemonitor.yaml"], "scrapeTimeout:", "scrapeTimout:", 1)
	if _, err := Decode(files); err == nil || !strings.Contains(err.Error(), `unknown field "scrapeTimout"`) {
		t.Errorf("decoding a ServiceMonitor with scrapeTimout: %v, want an unknown field error", err)
	}
}

// TestGenerated requires the chart's copy of the alert rules and the raw
// manifests in deploy/kubernetes to be what deploy/helm/generate.sh writes.
func TestGenerated(t *testing.T) {
	t.Parallel()
	a, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(chartDir, "files", "keyvault-rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Errorf("deploy/helm/keyvault/files/keyvault-rules.yaml differs from %s: run deploy/helm/generate.sh", rulesFile)
	}
	kit, err := RawKit(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, pattern := range []string{"*.yaml", "setup/*.yaml"} {
		ms, _ := filepath.Glob(filepath.Join(kitDir, pattern))
		for _, m := range ms {
			rel, _ := filepath.Rel(kitDir, m)
			found[filepath.ToSlash(rel)] = true
		}
	}
	for rel, want := range kit {
		got, err := os.ReadFile(filepath.Join(kitDir, filepath.FromSlash(rel)))
		if err != nil || string(got) != want {
			t.Errorf("deploy/kubernetes/%s is not what the chart renders: run deploy/helm/generate.sh", rel)
		}
		delete(found, rel)
	}
	for rel := range found {
		t.Errorf("deploy/kubernetes/%s is not rendered by the chart: run deploy/helm/generate.sh", rel)
	}
	if !t.Failed() {
		t.Logf("deploy/kubernetes: %d files, each as the chart renders them", len(kit))
	}
}
