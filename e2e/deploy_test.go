package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// The deploy kit's files that TestDeployKit checks, relative to the
// repository root. deploy/kubernetes is rendered from the Helm chart
// (deploy/helm/generate.sh); the chart's own test renders both modes.
const (
	deployRules      = "deploy/prometheus/keyvault-rules.yaml"
	deployRulesTest  = "deploy/prometheus/keyvault-rules.test.yaml"
	deployDashboard  = "deploy/grafana/keyvault-dashboard.json"
	deployPromRule   = "deploy/kubernetes/prometheusrule.yaml"
	deployConfigMap  = "deploy/kubernetes/configmap.yaml"
	deployStatefulSt = "deploy/kubernetes/statefulset.yaml"
	deployService    = "deploy/kubernetes/service.yaml"
	deploySvcMetrics = "deploy/kubernetes/service-metrics.yaml"
	deploySvcMonitor = "deploy/kubernetes/servicemonitor.yaml"
	deployPDB        = "deploy/kubernetes/poddisruptionbudget.yaml"
	deployNetPolicy  = "deploy/kubernetes/networkpolicy.yaml"
	deployKeysJob    = "deploy/kubernetes/setup/keys-init-job.yaml"
	deployDevEntry   = "deploy/docker/dev-entrypoint.sh"
)

// TestDeployKit checks what deploy/ ships for operators: the alert rules
// with promtool (and their unit tests), the PrometheusRule copy of them,
// the Kubernetes manifests against each other and the config validator,
// that every keyvault_ metric the rules and the Grafana dashboard name
// (with the labels and values they select) exists in a running vault's
// /metrics, and the dev image's entry point on the real binary.
func TestDeployKit(t *testing.T) {
	t.Parallel()
	t.Run("promtool", deployPromtool)
	t.Run("prometheusrule", deployPrometheusRuleInSync)
	t.Run("kubernetes", deployKubernetes)
	t.Run("dashboard", deployDashboardShape)
	t.Run("metrics exist", deployMetricsExist)
	t.Run("dev entrypoint", deployDevEntrypoint)
}

func deployPath(rel string) string { return filepath.Join(moduleRoot, filepath.FromSlash(rel)) }

func deployRead(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(deployPath(rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// deployPromtool runs `promtool check rules` and `promtool test rules`.
// Without promtool it skips, except under CI=true, where it fails.
func deployPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	needTool(t, "the promtool checks (make test-deps installs promtool)", err)
	for _, args := range [][]string{
		{"check", "rules", deployPath(deployRules)},
		{"test", "rules", deployPath(deployRulesTest)},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = moduleRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// deployPrometheusRuleInSync requires the PrometheusRule's groups to be
// those of the rules file: the chart renders one from the other.
func deployPrometheusRuleInSync(t *testing.T) {
	var rules, pr map[string]any
	if err := yaml.Unmarshal(deployRead(t, deployRules), &rules); err != nil {
		t.Fatalf("%s: %v", deployRules, err)
	}
	if err := yaml.Unmarshal(deployRead(t, deployPromRule), &pr); err != nil {
		t.Fatalf("%s: %v", deployPromRule, err)
	}
	if pr["kind"] != "PrometheusRule" || pr["apiVersion"] != "monitoring.coreos.com/v1" {
		t.Errorf("%s: kind %v, apiVersion %v; want PrometheusRule, monitoring.coreos.com/v1", deployPromRule, pr["kind"], pr["apiVersion"])
	}
	if !reflect.DeepEqual(pr["spec"], rules) {
		t.Errorf("%s differs from %s: run deploy/helm/generate.sh", deployPromRule, deployRules)
	}
}

// deployK8sObject is the part of a Kubernetes manifest the checks read.
type deployK8sObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name   string            `yaml:"name"`
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		// StatefulSet, Job
		Replicas    *int   `yaml:"replicas"`
		ServiceName string `yaml:"serviceName"`
		Selector    struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template             deployK8sPod `yaml:"template"`
		VolumeClaimTemplates []struct {
			Metadata struct {
				Name string `yaml:"name"`
			} `yaml:"metadata"`
		} `yaml:"volumeClaimTemplates"`
		// Service
		Ports []struct {
			Name       string `yaml:"name"`
			Port       int    `yaml:"port"`
			TargetPort string `yaml:"targetPort"`
		} `yaml:"ports"`
		// ServiceMonitor
		JobLabel  string `yaml:"jobLabel"`
		Endpoints []struct {
			Port string `yaml:"port"`
			Path string `yaml:"path"`
		} `yaml:"endpoints"`
		// PodDisruptionBudget
		MaxUnavailable *int `yaml:"maxUnavailable"`
		MinAvailable   *int `yaml:"minAvailable"`
	} `yaml:"spec"`
}

type deployK8sPod struct {
	Metadata struct {
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Spec struct {
		SecurityContext struct {
			RunAsNonRoot *bool `yaml:"runAsNonRoot"`
			RunAsUser    int   `yaml:"runAsUser"`
		} `yaml:"securityContext"`
		Containers []deployK8sContainer `yaml:"containers"`
		Volumes    []struct {
			Name      string         `yaml:"name"`
			ConfigMap map[string]any `yaml:"configMap"`
			Secret    struct {
				SecretName string `yaml:"secretName"`
			} `yaml:"secret"`
		} `yaml:"volumes"`
	} `yaml:"spec"`
}

type deployK8sContainer struct {
	Name  string   `yaml:"name"`
	Args  []string `yaml:"args"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	ReadinessProbe deployK8sProbe `yaml:"readinessProbe"`
	LivenessProbe  deployK8sProbe `yaml:"livenessProbe"`
	StartupProbe   deployK8sProbe `yaml:"startupProbe"`
	VolumeMounts   []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		SubPath   string `yaml:"subPath"`
	} `yaml:"volumeMounts"`
	SecurityContext struct {
		RunAsNonRoot             *bool `yaml:"runAsNonRoot"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		Capabilities             struct {
			Drop []string `yaml:"drop"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
}

type deployK8sProbe struct {
	HTTPGet struct {
		Path string `yaml:"path"`
		Port string `yaml:"port"`
	} `yaml:"httpGet"`
}

func deployManifest(t *testing.T, rel, kind string) *deployK8sObject {
	t.Helper()
	var o deployK8sObject
	if err := yaml.Unmarshal(deployRead(t, rel), &o); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	if o.Kind != kind {
		t.Fatalf("%s: kind %q, want %q", rel, o.Kind, kind)
	}
	return &o
}

// deploySubset reports whether sel is non-empty and every label of it is in
// labels with its value.
func deploySubset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return len(sel) > 0
}

// deployKubernetes validates the ConfigMap's keyvault.yaml and checks the
// manifests agree with it and with each other: ports, probes, PIN files,
// volumes, selectors, hardening.
func deployKubernetes(t *testing.T) {
	cm := deployManifest(t, deployConfigMap, "ConfigMap")
	sts := deployManifest(t, deployStatefulSt, "StatefulSet")
	svc := deployManifest(t, deployService, "Service")
	msvc := deployManifest(t, deploySvcMetrics, "Service")
	sm := deployManifest(t, deploySvcMonitor, "ServiceMonitor")
	pdb := deployManifest(t, deployPDB, "PodDisruptionBudget")
	job := deployManifest(t, deployKeysJob, "Job")

	cfg, err := config.ParseNoFS([]byte(cm.Data["keyvault.yaml"]))
	if err != nil {
		t.Fatalf("%s: the embedded keyvault.yaml is refused by the config validator:\n%v", deployConfigMap, err)
	}

	if sts.Spec.Replicas == nil || *sts.Spec.Replicas != 1 {
		t.Errorf("StatefulSet replicas %v, want 1: one process per bbolt file", sts.Spec.Replicas)
	}
	pod := sts.Spec.Template
	if !deploySubset(sts.Spec.Selector.MatchLabels, pod.Metadata.Labels) {
		t.Errorf("StatefulSet selector %v does not match its pod labels %v", sts.Spec.Selector.MatchLabels, pod.Metadata.Labels)
	}
	if sts.Spec.ServiceName != svc.Metadata.Name {
		t.Errorf("StatefulSet serviceName %q, want the Service %q", sts.Spec.ServiceName, svc.Metadata.Name)
	}
	// The alert rules select job="keyvault": the ServiceMonitor names the
	// scrape job after the metrics Service's label named by its jobLabel.
	if job := msvc.Metadata.Labels[sm.Spec.JobLabel]; sm.Spec.JobLabel == "" || job != "keyvault" {
		t.Errorf("ServiceMonitor jobLabel %q names the scrape job %q: the alert rules expect \"keyvault\"", sm.Spec.JobLabel, job)
	}
	for _, rel := range []string{deployService, deploySvcMetrics} {
		if !deploySubset(deployServiceSelector(t, rel), pod.Metadata.Labels) {
			t.Errorf("%s: selector does not match the pod labels %v", rel, pod.Metadata.Labels)
		}
	}
	if !deploySubset(sm.Spec.Selector.MatchLabels, msvc.Metadata.Labels) {
		t.Errorf("ServiceMonitor selector %v does not match the metrics Service labels %v", sm.Spec.Selector.MatchLabels, msvc.Metadata.Labels)
	}
	if !deploySubset(pdb.Spec.Selector.MatchLabels, pod.Metadata.Labels) {
		t.Errorf("PodDisruptionBudget selector %v does not match the pod labels %v", pdb.Spec.Selector.MatchLabels, pod.Metadata.Labels)
	}
	if pdb.Spec.MaxUnavailable == nil && pdb.Spec.MinAvailable == nil {
		t.Errorf("PodDisruptionBudget sets neither maxUnavailable nor minAvailable")
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "admin" || sm.Spec.Endpoints[0].Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %+v, want port admin, path /metrics", sm.Spec.Endpoints)
	}

	deployNetworkPolicy(t, pod.Metadata.Labels)
	// An admin token crosses the admin port only over TLS (the validator
	// refuses it in plain HTTP off loopback); the ServiceMonitor then
	// scrapes over HTTPS.
	if len(cfg.AdminTokenSHA256) > 0 && cfg.AdminTLS == nil && !cfg.AdminInsecurePlaintext {
		t.Errorf("%s: admin_token_sha256 without admin_tls", deployConfigMap)
	}

	if len(pod.Spec.Containers) != 1 || len(job.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("the StatefulSet has %d containers and the keys Job %d, want 1 each", len(pod.Spec.Containers), len(job.Spec.Template.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	wantPorts := map[string]string{"api": cfg.Listen, "admin": cfg.AdminListen}
	for name, addr := range wantPorts {
		_, port, _ := net.SplitHostPort(addr)
		found := false
		for _, p := range c.Ports {
			if p.Name == name {
				found = true
				if fmt.Sprint(p.ContainerPort) != port {
					t.Errorf("container port %s is %d, but the config listens on %s", name, p.ContainerPort, addr)
				}
			}
		}
		if !found {
			t.Errorf("container has no port named %s", name)
		}
		// The API on one Service, the admin port on the metrics Service.
		s := map[string]*deployK8sObject{"api": svc, "admin": msvc}[name]
		svcFound := false
		for _, p := range s.Spec.Ports {
			if p.Name == name {
				svcFound = p.TargetPort == name
			}
		}
		if !svcFound {
			t.Errorf("Service %s has no port %s with targetPort %s", s.Metadata.Name, name, name)
		}
	}
	for what, pr := range map[string]struct {
		probe deployK8sProbe
		path  string
	}{"readiness": {c.ReadinessProbe, "/readyz"}, "liveness": {c.LivenessProbe, "/healthz"}} {
		if pr.probe.HTTPGet.Path != pr.path || pr.probe.HTTPGet.Port != "admin" {
			t.Errorf("%s probe %+v, want GET %s on port admin", what, pr.probe.HTTPGet, pr.path)
		}
	}
	if !slices.Equal(c.Args, []string{"serve", "--config", "/etc/keyvault/keyvault.yaml"}) {
		t.Errorf("container args %q", c.Args)
	}

	// Hardening.
	if pod.Spec.SecurityContext.RunAsNonRoot == nil || !*pod.Spec.SecurityContext.RunAsNonRoot || pod.Spec.SecurityContext.RunAsUser == 0 {
		t.Errorf("pod securityContext %+v: want runAsNonRoot and a non-zero runAsUser", pod.Spec.SecurityContext)
	}
	for _, ct := range []struct {
		where string
		c     deployK8sContainer
	}{{"StatefulSet", c}, {"keys-init Job", job.Spec.Template.Spec.Containers[0]}} {
		sc := ct.c.SecurityContext
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			!slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) {
			t.Errorf("%s container securityContext %+v: want readOnlyRootFilesystem, no privilege escalation, drop ALL", ct.where, sc)
		}
	}

	// Every member's PIN is a file on a Secret's mount, in the server and
	// in the keys-init Job alike; PINs never sit in the config.
	for _, ct := range []struct {
		where string
		pod   deployK8sPod
	}{{"StatefulSet", pod}, {"keys-init Job", job.Spec.Template}} {
		for i, m := range cfg.HSM.Members {
			if m.PinFile == "" || m.PinEnv != "" {
				t.Errorf("%s: hsm.members[%d]: pin_file %q, pin_env %q; the manifests mount PINs as files from a Secret", deployConfigMap, i, m.PinFile, m.PinEnv)
				continue
			}
			if deploySecretAt(ct.pod, path.Dir(m.PinFile)) == "" {
				t.Errorf("%s: hsm.members[%d].pin_file %s is not on a Secret's mount", ct.where, i, m.PinFile)
			}
		}
	}

	// The store lives on the volume claim; the files the config names are
	// under a mount.
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	var claims []string
	for _, v := range sts.Spec.VolumeClaimTemplates {
		claims = append(claims, v.Metadata.Name)
	}
	if name := mounts[path.Dir(cfg.Store.Path)]; name == "" || !slices.Contains(claims, name) {
		t.Errorf("store.path %s: its directory is not the mount of a volumeClaimTemplate (mounts %v, claims %v)", cfg.Store.Path, mounts, claims)
	}
	if cfg.TLS != nil {
		for _, f := range []string{cfg.TLS.CertFile, cfg.TLS.KeyFile} {
			if deploySecretAt(pod, path.Dir(f)) == "" {
				t.Errorf("tls file %s is not on a Secret's mount (mounts %v)", f, mounts)
			}
		}
	}
	if mounts["/etc/keyvault/keyvault.yaml"] == "" {
		t.Errorf("the config is not mounted at /etc/keyvault/keyvault.yaml (mounts %v)", mounts)
	}
}

// deployNetworkPolicy checks that the NetworkPolicy selects the keyvault
// pod, restricts its ingress, lets the API port in, and lets the admin port
// in only from selected peers, never from everywhere.
func deployNetworkPolicy(t *testing.T, podLabels map[string]string) {
	var np struct {
		Kind string `yaml:"kind"`
		Spec struct {
			PodSelector struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"podSelector"`
			PolicyTypes []string `yaml:"policyTypes"`
			Ingress     []struct {
				Ports []struct {
					Port string `yaml:"port"`
				} `yaml:"ports"`
				From []map[string]any `yaml:"from"`
			} `yaml:"ingress"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(deployRead(t, deployNetPolicy), &np); err != nil {
		t.Fatalf("%s: %v", deployNetPolicy, err)
	}
	if np.Kind != "NetworkPolicy" || !deploySubset(np.Spec.PodSelector.MatchLabels, podLabels) || !slices.Contains(np.Spec.PolicyTypes, "Ingress") {
		t.Fatalf("%s: kind %q, podSelector %v, policyTypes %v: want a NetworkPolicy on the keyvault pod's ingress", deployNetPolicy, np.Kind, np.Spec.PodSelector.MatchLabels, np.Spec.PolicyTypes)
	}
	allowed := map[string]bool{}
	for _, rule := range np.Spec.Ingress {
		for _, p := range rule.Ports {
			if p.Port == "admin" && len(rule.From) == 0 {
				t.Errorf("%s: the admin port is open to every peer", deployNetPolicy)
			}
			allowed[p.Port] = true
		}
	}
	if !allowed["api"] || !allowed["admin"] {
		t.Errorf("%s: ports allowed %v, want api and admin (by name)", deployNetPolicy, allowed)
	}
}

// deploySecretAt returns the Secret mounted at dir in the pod's first
// container, or "".
func deploySecretAt(pod deployK8sPod, dir string) string {
	if len(pod.Spec.Containers) == 0 {
		return ""
	}
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		if m.MountPath != dir {
			continue
		}
		for _, v := range pod.Spec.Volumes {
			if v.Name == m.Name {
				return v.Secret.SecretName
			}
		}
	}
	return ""
}

// deployServiceSelector reads a Service's plain selector (a map, not
// matchLabels).
func deployServiceSelector(t *testing.T, rel string) map[string]string {
	var o struct {
		Spec struct {
			Selector map[string]string `yaml:"selector"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(deployRead(t, rel), &o); err != nil {
		t.Fatal(err)
	}
	return o.Spec.Selector
}

// deployGrafanaDashboard is the part of the dashboard JSON the checks read.
type deployGrafanaDashboard struct {
	UID           string               `json:"uid"`
	Title         string               `json:"title"`
	SchemaVersion int                  `json:"schemaVersion"`
	Panels        []deployGrafanaPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type deployGrafanaPanel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource map[string]any `json:"datasource"`
	GridPos    struct{ H, W, X, Y int }
	Targets    []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []deployGrafanaPanel `json:"panels"`
}

func deployLoadDashboard(t *testing.T) *deployGrafanaDashboard {
	t.Helper()
	var d deployGrafanaDashboard
	if err := json.Unmarshal(deployRead(t, deployDashboard), &d); err != nil {
		t.Fatalf("%s: %v", deployDashboard, err)
	}
	return &d
}

// deployPanels flattens the panels, rows' nested panels included.
func deployPanels(ps []deployGrafanaPanel) []deployGrafanaPanel {
	var out []deployGrafanaPanel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, deployPanels(p.Panels)...)
	}
	return out
}

// deployDashboardShape checks what makes the dashboard importable as is:
// a Prometheus datasource variable that every panel uses, unique panel
// IDs, panels inside the 24-column grid, a query in every graph.
func deployDashboardShape(t *testing.T) {
	d := deployLoadDashboard(t)
	if d.UID == "" || d.Title == "" || d.SchemaVersion < 36 {
		t.Errorf("dashboard uid %q, title %q, schemaVersion %d: want both set and schemaVersion 36 or later", d.UID, d.Title, d.SchemaVersion)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDS = true
		}
	}
	if !hasDS {
		t.Errorf("dashboard has no datasource variable of type prometheus")
	}
	ids := map[int]string{}
	for _, p := range deployPanels(d.Panels) {
		if other, ok := ids[p.ID]; ok {
			t.Errorf("panels %q and %q share id %d", other, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		if p.GridPos.X < 0 || p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H <= 0 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource["uid"] != "${datasource}" {
			t.Errorf("panel %q: datasource %v, want the ${datasource} variable", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q target %s: empty expr", p.Title, tg.RefID)
			}
		}
	}
}

// deployMetricNameRE finds keyvault metric names in PromQL and in prose.
var deployMetricNameRE = regexp.MustCompile(`\bkeyvault_[a-zA-Z0-9_:]+`)

// deployGroupingRE finds by (...) and without (...) clauses.
var deployGroupingRE = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)

// deployTargetLabels are added by Prometheus when it scrapes (and by the
// Prometheus Operator), so /metrics does not show them.
var deployTargetLabels = map[string]bool{
	"job": true, "instance": true, "namespace": true, "pod": true, "service": true, "endpoint": true, "container": true,
}

// deployMatcher is one label matcher of a selector: name op "value".
type deployMatcher struct{ label, op, value string }

// deployRef is one metric name used in a PromQL expression, with the
// matchers of its selector.
type deployRef struct {
	name     string
	matchers []deployMatcher
}

// deployParseRefs finds every keyvault_ selector in a PromQL expression and
// reads its label matchers (quoted values may hold braces, as route
// patterns do).
func deployParseRefs(expr string) ([]deployRef, error) {
	var refs []deployRef
	for _, loc := range deployMetricNameRE.FindAllStringIndex(expr, -1) {
		ref := deployRef{name: expr[loc[0]:loc[1]]}
		i := loc[1]
		for i < len(expr) && expr[i] == ' ' {
			i++
		}
		if i < len(expr) && expr[i] == '{' {
			i++
			for {
				for i < len(expr) && strings.IndexByte(" ,\n\t", expr[i]) >= 0 {
					i++
				}
				if i >= len(expr) {
					return nil, fmt.Errorf("%s: unterminated selector", ref.name)
				}
				if expr[i] == '}' {
					break
				}
				j := i
				for j < len(expr) && (expr[j] == '_' || expr[j] >= 'a' && expr[j] <= 'z' || expr[j] >= 'A' && expr[j] <= 'Z' || j > i && expr[j] >= '0' && expr[j] <= '9') {
					j++
				}
				if j == i {
					return nil, fmt.Errorf("%s: bad label name at %q", ref.name, expr[i:])
				}
				m := deployMatcher{label: expr[i:j]}
				i = j
				for i < len(expr) && expr[i] == ' ' {
					i++
				}
				for _, op := range []string{"=~", "!~", "!=", "="} {
					if strings.HasPrefix(expr[i:], op) {
						m.op = op
						break
					}
				}
				if m.op == "" {
					return nil, fmt.Errorf("%s: no operator after label %s", ref.name, m.label)
				}
				i += len(m.op)
				for i < len(expr) && expr[i] == ' ' {
					i++
				}
				if i >= len(expr) || strings.IndexByte("\"'`", expr[i]) < 0 {
					return nil, fmt.Errorf("%s: label %s: value is not quoted", ref.name, m.label)
				}
				q := expr[i]
				i++
				var val strings.Builder
				for i < len(expr) && expr[i] != q {
					if expr[i] == '\\' && q != '`' && i+1 < len(expr) {
						i++
					}
					val.WriteByte(expr[i])
					i++
				}
				if i >= len(expr) {
					return nil, fmt.Errorf("%s: label %s: unterminated value", ref.name, m.label)
				}
				i++
				m.value = val.String()
				ref.matchers = append(ref.matchers, m)
			}
		}
		refs = append(refs, ref)
	}
	return refs, nil
}

// deployExpr is a PromQL expression with where it comes from.
type deployExpr struct{ where, expr string }

// deployExpressions returns the PromQL of the rules file and the
// dashboard, and the full text of each file (whose every keyvault_ name,
// in prose too, must exist).
func deployExpressions(t *testing.T) (exprs []deployExpr, texts map[string]string) {
	var rules struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert  string `yaml:"alert"`
				Record string `yaml:"record"`
				Expr   string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(deployRead(t, deployRules), &rules); err != nil {
		t.Fatalf("%s: %v", deployRules, err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, deployExpr{fmt.Sprintf("%s: rule %s%s", deployRules, r.Alert, r.Record), r.Expr})
		}
	}
	d := deployLoadDashboard(t)
	for _, p := range deployPanels(d.Panels) {
		for _, tg := range p.Targets {
			exprs = append(exprs, deployExpr{fmt.Sprintf("%s: panel %q target %s", deployDashboard, p.Title, tg.RefID), tg.Expr})
		}
	}
	for _, v := range d.Templating.List {
		q, _ := v.Query.(string)
		if m, ok := v.Query.(map[string]any); ok {
			q, _ = m["query"].(string)
		}
		if v.Type == "query" {
			exprs = append(exprs, deployExpr{fmt.Sprintf("%s: variable %s", deployDashboard, v.Name), q})
		}
	}
	texts = map[string]string{}
	for _, f := range []string{deployRules, deployRulesTest, deployDashboard} {
		texts[f] = string(deployRead(t, f))
	}
	return exprs, texts
}

// deployFamily is one metric family of a /metrics text: its type, and the
// label names and values of its series (a histogram's _bucket, _sum and
// _count included).
type deployFamily struct {
	typ    string
	labels map[string]map[string]bool
}

// deployFamilies reads the families of a /metrics text by name. A family
// with no series at all is not there: client_golang leaves it out.
func deployFamilies(t *testing.T, text string) map[string]*deployFamily {
	t.Helper()
	fams := map[string]*deployFamily{}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			fams[f[2]] = &deployFamily{typ: f[3], labels: map[string]map[string]bool{}}
		}
	}
	samples, err := parseMetrics(text)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range samples {
		fam := fams[s.name]
		if fam == nil {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(s.name, suf); ok && fams[base] != nil {
					fam = fams[base]
				}
			}
		}
		if fam == nil {
			continue
		}
		for k, v := range s.labels {
			if fam.labels[k] == nil {
				fam.labels[k] = map[string]bool{}
			}
			fam.labels[k][v] = true
		}
	}
	return fams
}

// deployFamilyOf resolves a name used in PromQL to its family: the name
// itself, or a histogram's _bucket, _sum or _count series.
func deployFamilyOf(fams map[string]*deployFamily, name string) (string, *deployFamily) {
	if f := fams[name]; f != nil {
		return name, f
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok {
			if f := fams[base]; f != nil && (f.typ == "histogram" || f.typ == "summary" && suf != "_bucket") {
				return base, f
			}
		}
	}
	return "", nil
}

// deployMetricsExist runs a dev vault through traffic that makes every
// family show labelled series (errors, a lockout, a 404, HSM sheds, an HSM
// outage and its end), then checks each keyvault_ name, label and value
// that a rule or panel uses against its /metrics.
func deployMetricsExist(t *testing.T) {
	softhsmtest.Module(t)
	exprs, texts := deployExpressions(t)
	text := deployTraffic(t)
	fams := deployFamilies(t, text)

	// Every name anywhere in the files (queries, descriptions, the rule
	// tests' series) must exist.
	used := map[string]bool{}
	for file, body := range texts {
		names := map[string]bool{}
		for _, n := range deployMetricNameRE.FindAllString(body, -1) {
			names[n] = true
		}
		for n := range names {
			base, fam := deployFamilyOf(fams, n)
			if fam == nil {
				t.Errorf("%s names metric %s, which a running vault does not export", file, n)
				continue
			}
			used[base] = true
		}
		if min := 10; len(names) < min {
			t.Errorf("%s: found only %d keyvault_ metric names, want at least %d; is the extraction broken?", file, len(names), min)
		}
	}

	// Each selector's labels and values, and each grouping label, must
	// exist on the families the expression reads.
	for _, e := range exprs {
		refs, err := deployParseRefs(e.expr)
		if err != nil {
			t.Errorf("%s: %v", e.where, err)
			continue
		}
		known := map[string]bool{}
		for _, r := range refs {
			_, fam := deployFamilyOf(fams, r.name)
			if fam == nil {
				continue // reported above
			}
			for l := range fam.labels {
				known[l] = true
			}
			for _, m := range r.matchers {
				if deployTargetLabels[m.label] {
					continue
				}
				values, ok := fam.labels[m.label]
				if !ok {
					t.Errorf("%s: %s has no label %q", e.where, r.name, m.label)
					continue
				}
				if strings.Contains(m.value, "$") {
					continue // a dashboard variable
				}
				switch m.op {
				case "=":
					if !values[m.value] {
						t.Errorf("%s: %s{%s=%q}: no such series; values seen: %v", e.where, r.name, m.label, m.value, slices.Sorted(maps.Keys(values)))
					}
				case "=~":
					re, err := regexp.Compile("^(?:" + m.value + ")$")
					if err != nil {
						t.Errorf("%s: %s{%s=~%q}: %v", e.where, r.name, m.label, m.value, err)
						continue
					}
					matched := false
					for v := range values {
						matched = matched || re.MatchString(v)
					}
					if !matched {
						t.Errorf("%s: %s{%s=~%q} matches no series; values seen: %v", e.where, r.name, m.label, m.value, slices.Sorted(maps.Keys(values)))
					}
				}
			}
		}
		for _, g := range deployGroupingRE.FindAllStringSubmatch(e.expr, -1) {
			for _, l := range strings.Split(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" && !known[l] && !deployTargetLabels[l] {
					t.Errorf("%s: groups by label %q, which none of its keyvault_ metrics has", e.where, l)
				}
			}
		}
	}

	var unused []string
	for name := range fams {
		if strings.HasPrefix(name, "keyvault_") && !used[name] {
			unused = append(unused, name)
		}
	}
	slices.Sort(unused)
	if len(unused) > 0 {
		t.Logf("keyvault metric families that neither the rules nor the dashboard use: %v", unused)
	}
}

// deployTraffic runs a dev vault through every outcome the deploy kit
// watches and returns its /metrics text at the end.
func deployTraffic(t *testing.T) string {
	dir := t.TempDir()
	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)
	user, pin, secret := randID("deploy"), randPIN("deploy"), randBytes(32)
	c.mustEnroll(t, http.StatusCreated, user, secret, pin, 3)
	c.mustEnroll(t, http.StatusOK, user, secret, pin, 3)
	c.mustRecover(t, user, pin, secret)
	wantProblem(t, "wrong PIN", c.recover(t, user, "wrong-pin-1"), http.StatusForbidden, "wrong_pin")
	wantProblem(t, "PIN change, wrong PIN", c.changePIN(t, user, "wrong-pin-2", pin+"-new"), http.StatusForbidden, "wrong_pin")
	wantProblem(t, "the last wrong guess", c.recover(t, user, "wrong-pin-3"), http.StatusGone, "locked")
	wantProblem(t, "unknown user", c.recover(t, randID("missing"), pin), http.StatusNotFound, "not_found")
	wantProblem(t, "bad user_id", c.recover(t, "bad id", pin), http.StatusBadRequest, "invalid_request")
	c.mustEnroll(t, http.StatusCreated, user+"x", secret, pin, 0)
	if r := c.delete(t, user+"x"); r.Status != http.StatusNoContent {
		t.Fatalf("DELETE: %v", r)
	}
	v.Stop()

	// HSM sheds: one session, a 1 ms queue, and a burst of enrollments.
	cfg := filepath.Join(dir, "keyvault.yaml")
	setRateLimits(t, cfg, `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 1ms
`)
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "max_sessions: 8") {
		t.Fatalf("dev config has no \"max_sessions: 8\" to lower:\n%s", b)
	}
	if err := os.WriteFile(cfg, []byte(strings.ReplaceAll(string(b), "max_sessions: 8", "max_sessions: 1")), 0o600); err != nil {
		t.Fatal(err)
	}
	v = startDevLimited(t, dir)
	c = newClient(t, v.API, v.Token)
	for round := 0; ; round++ {
		var wg sync.WaitGroup
		for range 48 {
			wg.Go(func() {
				_, _ = c.call(http.MethodPut, backupPath(randID("shed")), map[string]any{"secret": b64(secret), "pin": "1234"})
			})
		}
		wg.Wait()
		samples, _ := metrics(t, v.Admin)
		if n, _ := metricSum(samples, "keyvault_hsm_shed_total", nil); n > 0 {
			break
		}
		if round == 20 {
			t.Fatalf("no HSM shed after %d bursts of 48 enrollments with one session and a 1 ms queue", round+1)
		}
	}

	// An HSM outage: the token directory goes away (HSM errors, the member
	// taken out, 503s), then comes back (readmitted).
	restore := takeTokensAway(t, dir)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := c.enroll(t, randID("outage"), secret, "1234", 0)
		if r.Status == http.StatusServiceUnavailable && get(t, v.Admin+"/readyz").Status == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the token went away, PUT answers %v and /readyz is not 503", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	restore()
	deadline = time.Now().Add(30 * time.Second)
	for get(t, v.Admin+"/readyz").Status != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatalf("30 s after the token came back, /readyz still fails; the log ends:\n%s", tail(v.Logs(), 12))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Served again without a restart. One session and a 1 ms queue still
	// shed now and then (a readmission probe or a batch's anchor write can
	// hold the session), so a shed 503 is retried as a client would.
	// A retried PUT may find the first try's write (its answer withheld).
	if r := retryShed(t, func() response { return c.enroll(t, user+"y", secret, pin, 0) }); r.Status != http.StatusCreated && r.Status != http.StatusOK {
		t.Fatalf("PUT after the outage: got %v, want 201 or 200", r)
	}
	if r := retryShed(t, func() response { return c.recover(t, user+"y", pin) }); r.Status != http.StatusOK || r.JSON(t)["secret"] != b64(secret) {
		t.Fatalf("recover after the outage: got %v, want 200 with the secret", r)
	}
	samples, text := metrics(t, v.Admin)
	for _, name := range []string{"keyvault_hsm_errors_total", "keyvault_hsm_member_ejections_total", "keyvault_hsm_member_readmissions_total", "keyvault_hsm_shed_total"} {
		if n, _ := metricSum(samples, name, nil); n == 0 {
			t.Errorf("after the traffic, %s is %v; the traffic was meant to raise it", name, n)
		}
	}
	v.Stop()
	return text
}

// retryShed calls do until it answers something other than a 503
// unavailable, at most 50 times, and returns the last answer.
func retryShed(t *testing.T, do func() response) response {
	t.Helper()
	var r response
	for range 50 {
		if r = do(); r.Status != http.StatusServiceUnavailable || !strings.Contains(string(r.Body), `"code":"unavailable"`) {
			return r
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r
}

// deployDevEntrypoint runs the dev image's entry point on the real binary,
// without Docker: the first start sets a directory up and then serves the
// API on every interface, which the config allows only with the
// insecure_plaintext the script adds; the second start serves the same
// data with the same token.
func deployDevEntrypoint(t *testing.T) {
	softhsmtest.Module(t)
	dir := filepath.Join(t.TempDir(), "dev")
	user, pin, secret := randID("image"), randPIN("image"), randBytes(32)
	for run := 1; run <= 2; run++ {
		api, admin, stop := deployStartEntrypoint(t, dir)
		tok, err := os.ReadFile(filepath.Join(dir, "token"))
		if err != nil {
			t.Fatal(err)
		}
		c := newClient(t, api, strings.TrimSpace(string(tok)))
		if run == 1 {
			c.mustEnroll(t, http.StatusCreated, user, secret, pin, 0)
		} else {
			c.mustRecover(t, user, pin, secret)
		}
		if r := get(t, admin+"/readyz"); r.Status != http.StatusOK {
			t.Errorf("start %d: /readyz: %v", run, r)
		}
		stop()
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "keyvault.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if n := regexp.MustCompile(`(?m)^insecure_plaintext: true\b`).FindAllIndex(cfg, -1); len(n) != 1 {
		t.Errorf("keyvault.yaml has %d lines \"insecure_plaintext: true\", want 1:\n%s", len(n), cfg)
	}
}

// deployStartEntrypoint runs dev-entrypoint.sh on dir with the API on
// 0.0.0.0 (a free port) and the admin listener on loopback, and waits until
// it serves. It returns loopback URLs of both and a func that stops it
// with SIGTERM and requires exit status 0.
func deployStartEntrypoint(t *testing.T, dir string) (api, admin string, stop func()) {
	t.Helper()
	out := &logBuffer{}
	cmd := exec.Command("sh", deployPath(deployDevEntry))
	cmd.Env = append(os.Environ(),
		"PATH="+filepath.Dir(keyvaultBin)+string(os.PathListSeparator)+os.Getenv("PATH"),
		"KEYVAULT_DEV_DIR="+dir,
		"KEYVAULT_DEV_LISTEN=0.0.0.0:0",
		"KEYVAULT_DEV_ADMIN_LISTEN=127.0.0.1:0")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	exited := false
	// wait reports whether the process has exited within d, and how.
	wait := func(d time.Duration) (bool, error) {
		if exited {
			return true, nil
		}
		select {
		case err := <-done:
			exited = true
			return true, err
		case <-time.After(d):
			return false, nil
		}
	}
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			wait(10 * time.Second)
		}
	})
	deadline := time.Now().Add(2 * startTimeout) // a setup run, then the real one
	for {
		if a, ad, ok := servingLine(out.Bytes()); ok {
			api, admin = a, ad
			break
		}
		if ok, err := wait(20 * time.Millisecond); ok {
			t.Fatalf("dev-entrypoint.sh exited before serving: %v\n%s", err, out.Bytes())
		}
		if time.Now().After(deadline) {
			t.Fatalf("dev-entrypoint.sh did not serve within %v:\n%s", 2*startTimeout, out.Bytes())
		}
	}
	host, port, err := net.SplitHostPort(api)
	if err != nil {
		t.Fatal(err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		t.Errorf("the API listens on %s, want every interface (0.0.0.0)", api)
	}
	stop = func() {
		t.Helper()
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		ok, err := wait(30 * time.Second)
		if !ok {
			t.Fatalf("dev-entrypoint.sh did not stop within 30 s of SIGTERM:\n%s", out.Bytes())
		}
		if err != nil {
			t.Errorf("dev-entrypoint.sh exited with %v after SIGTERM, want status 0:\n%s", err, out.Bytes())
		}
	}
	return "http://" + net.JoinHostPort("127.0.0.1", port), "http://" + admin, stop
}
