import torch
from phyai_cache_lab.bench.workload import reference_workload
torch.set_num_threads(1)
w = reference_workload(50, batch_size=2)
pipe = w.make_pipeline()
rec = []
orig = pipe.transformer.forward
def fwd(*a, **k):
    out = orig(*a, **k)
    rec.append((k["hidden_states"].clone(), k["timestep"].clone(), out[0].clone() if isinstance(out, tuple) else out.sample.clone()))
    return out
pipe.transformer.forward = fwd
res = pipe(**w.call_kwargs(0))
print("timesteps", [round(r[1].reshape(-1)[0].item(), 4) for r in rec][:5], rec[-1][1])
print("sigmas", pipe.scheduler.sigmas[:5], pipe.scheduler.sigmas[-3:])
# check sigma convention: x_{k+1} == x_k + (s_{k+1}-s_k) v_k
s = pipe.scheduler.sigmas
k = 10
print("euler check", (rec[k+1][0] - (rec[k][0] + (s[k+1]-s[k]) * rec[k][2])).abs().max().item(), rec[k][1].reshape(-1)[0].item(), s[k].item())
def ex(vals, pts, x):  # order-1 extrapolation from two points
    (a, pa), (b, pb) = (vals[0], pts[0]), (vals[1], pts[1])
    return b + (b - a) / (pb - pa) * (x - pb)
for sched in ([0, 5, 12, 22, 33, 44], [0, 2, 14, 28, 43]):
    for i in range(1, len(sched)):
        a, b = sched[i-1], sched[i]
        end = sched[i+1] if i+1 < len(sched) else 50
        errs_v, errs_d = [], []
        for j in range(b+1, end):
            x, sig, v = rec[j][0], s[j].item(), rec[j][2]
            vf = ex([rec[a][2], rec[b][2]], [a, b], j)
            x0 = lambda r, q: r[0] - s[q].item() * r[2]
            x0f = ex([x0(rec[a], a), x0(rec[b], b)], [a, b], j)
            vd = (x - x0f) / sig
            errs_v.append(((vf - v).norm() / v.norm()).item()); errs_d.append(((vd - v).norm() / v.norm()).item())
        if errs_v:
            print(sched, (a, b), "v err max %.4f mean %.4f | data err max %.4f mean %.4f" % (max(errs_v), sum(errs_v)/len(errs_v), max(errs_d), sum(errs_d)/len(errs_d)))
print("--- per target, order 0/1, mean rel velocity error over the cached steps of each schedule")
def to_t(name, r, q):
    x, v, sg = r[0], r[2], s[q].item()
    return {"v": v, "x0": x - sg * v, "eps": x + (1 - sg) * v}[name]
def back(name, f, x, sg):
    return {"v": f, "x0": (x - f) / sg, "eps": (f - x) / (1 - sg)}[name]
for sched in ([0, 5, 12, 22, 33, 44], [0, 2, 14, 28, 43]):
    for name in ("v", "x0", "eps"):
        for order in (0, 1):
            errs = []
            for i in range(1, len(sched)):
                a, b = sched[i-1], sched[i]
                end = sched[i+1] if i+1 < len(sched) else 50
                for j in range(b+1, end):
                    x, v = rec[j][0], rec[j][2]
                    fa, fb = to_t(name, rec[a], a), to_t(name, rec[b], b)
                    f = fb if order == 0 else ex([fa, fb], [a, b], j)
                    errs.append(((back(name, f, x, s[j].item()) - v).norm() / v.norm()).item())
            print(sched, name, order, "mean %.4f max %.4f last-6 mean %.4f" % (sum(errs)/len(errs), max(errs), sum(errs[-6:])/6))
import math
print("--- axis lambda = log((1-s)/s) (DPM-Solver++'s), order 1")
lam = lambda q: math.log((1 - s[q].item()) / s[q].item()) if 0 < s[q].item() < 1 else (-20.0 if s[q].item() >= 1 else 20.0)
for sched in ([0, 5, 12, 22, 33, 44], [0, 2, 14, 28, 43]):
    for name in ("v", "x0", "eps"):
        errs = []
        for i in range(1, len(sched)):
            a, b = sched[i-1], sched[i]
            if a == 0: a_l = None
            end = sched[i+1] if i+1 < len(sched) else 50
            for j in range(b+1, end):
                x, v = rec[j][0], rec[j][2]
                fa, fb = to_t(name, rec[a], a), to_t(name, rec[b], b)
                f = fb if a == 0 else ex([fa, fb], [lam(a), lam(b)], lam(j))
                errs.append(((back(name, f, x, s[j].item()) - v).norm() / v.norm()).item())
        print(sched, name, "lambda o1 (o0 after step 0) mean %.4f max %.4f" % (sum(errs)/len(errs), max(errs)))
