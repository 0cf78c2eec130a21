"""Every token-reduction method on the bundled CIFAR-10 model at three FLOPs budgets.

    python eval.py --config configs/compare_methods.py
    python eval.py --config configs/compare_methods.py --config.methods="tome, pitome" --config.limit=2000

A budget is ToMe's GFLOPs per image at each `budget_r`; every other method gets
the `r` schedule that lands within `budget_tolerance` of it (`budget.choose_r`'s
bisection). Any model the eval config takes works (`--config.model=`).
"""

from tome_jax.configs import eval_cifar10


def get_config():
    config = eval_cifar10.get_config()
    # What to compare (tome_jax.reduce names): the methods whose knob is r. DiffRate's per-block
    # schedule comes from a search per budget (configs/diffrate_search_cifar10.py), DTEM's
    # metric from training (without trained metric layers it is ToMe).
    config.methods = "tome, pitome, mctf, tofu, dct, evit, random_drop"
    config.budget_method = "tome"  # the method whose GFLOPs at budget_r set the budgets
    config.budget_r = "4, (6, -1), (8, -1)"  # one budget per r: budget_method's GFLOPs per image there
    config.budget_tolerance = 0.03  # each method's GFLOPs within this share of the budget
    config.workdir = "results/compare_methods"
    return config
