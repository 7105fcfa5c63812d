"""Which pointer arguments each Triton kernel writes: what ``python -m bench.kernels`` needs to split a
launch's memory traffic into bytes read and bytes written.

``WRITES[kernel name]``: the arguments (names as in the kernel's signature) the kernel only stores to.
Every other tensor argument counts as read. ``UPDATES[kernel name]``: arguments it both loads and stores
(an in-place update or an atomic accumulation), counted as read and written; none so far.

Every kernel a launcher starts must have an entry here (``tests/interpret/test_kernel_count.py`` fails
on a launched kernel without one, and on a name here that is not a pointer argument of that kernel). A
kernel that writes nothing declares an empty set. The table is also checked against what the kernels
do: under the interpreter that test snapshots every tensor argument and requires the arguments a
launch changed to be exactly the declared ones (over the whole model, forward and backward).
"""

WRITES = {
    # attention.py
    "_attn_fwd": {"o_ptr", "lse_ptr"},
    "_attn_bwd_preprocess": {"delta_ptr"},
    "_attn_bwd_dkdv": {"dqkv_ptr"},  # the K and V thirds of dqkv
    "_attn_bwd_dq": {"dqkv_ptr"},  # the Q third of dqkv
    # conv.py
    "_conv3x3_kernel": {"y_ptr", "part_ptr"},
    # linear.py
    "_linear_kernel": {"out_ptr", "tok_ptr", "mean_ptr", "rstd_ptr"},
    # ln_backward.py
    "_ln_linear_bwd_kernel": {"dx_ptr", "dlw_ptr", "dlb_ptr"},
    # resample.py
    "_gn_relu_pool_kernel": {"x_ptr", "pool_ptr"},
    "_upsample2x_kernel": {"out_ptr"},
    # group_norm.py
    "_gn_stats_kernel": {"part_ptr"},
    "_gn_combine_kernel": {"mean_ptr", "rstd_ptr"},
    "_gn_apply_kernel": {"y_ptr"},
    "_gn_apply_partials_kernel": {"y_ptr", "mean_ptr", "rstd_ptr"},
    "_gn_bwd_reduce_kernel": {"part_ptr"},
    "_gn_bwd_combine_kernel": {"demb_ptr", "dwb_ptr", "dbb_ptr", "sums_ptr"},
    "_gn_bwd_dx_kernel": {"dx_ptr"},
    "_gn_bwd_param_kernel": {"dw_ptr", "db_ptr"},
    # time_embedding.py
    "_temb_fwd_kernel": {"down_ptr", "up_ptr"},
    "_temb_bwd_kernel": {"drw_ptr", "drb_ptr", "dsw_ptr", "dsb_ptr"},
}

UPDATES = {}
