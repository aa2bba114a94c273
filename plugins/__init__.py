"""The built-in plugins, registered through this project's own entry point (group ``lvlmva``)
exactly as a third party's plugins are. Factories are lazy strings so that a run imports only
the plugins it uses (an OpenAI critic never imports transformers)."""

from __future__ import annotations

from lvlmva.hookspecs import hookimpl

BUILTINS: dict[str, dict[str, str]] = {
    "dataset": {
        "decoy-mnist": "lvlmva.datasets.decoy_mnist:DecoyMnistProvider",
        "synthetic-skin": "lvlmva.datasets.synthetic:SyntheticSkinProvider",
        "synthetic-knee": "lvlmva.datasets.synthetic:SyntheticKneeProvider",
        "knee-folder": "lvlmva.datasets.folders:KneeFolderProvider",
        "isic-folder": "lvlmva.datasets.folders:IsicFolderProvider",
        "medmnist": "lvlmva.datasets.folders:MedmnistProvider",
        "waterbirds": "lvlmva.datasets.subpopulation:WaterbirdsProvider",
        "celeba": "lvlmva.datasets.subpopulation:CelebaProvider",
    },
    "model": {
        "mlp": "lvlmva.plugins.models.mlp:MlpFactory",
        "resnet": "lvlmva.plugins.models.resnet:ResNetFactory",
        "cnn": "lvlmva.plugins.models.cnn:SmallCnnFactory",
    },
    "attributor": {
        "deeplift-shap": "lvlmva.plugins.attributors.deeplift_shap:DeepLiftShapAttributor",
        "integrated-gradients": "lvlmva.plugins.attributors.gradients:IntegratedGradientsAttributor",
        "gradient-shap": "lvlmva.plugins.attributors.gradients:GradientShapAttributor",
        "grad-cam": "lvlmva.plugins.attributors.gradients:GradCamAttributor",
    },
    "segmenter": {
        "ppeps-wgm": "lvlmva.plugins.segmenters.ppeps_wgm:PpepsWgmSegmenter",
    },
    "critic": {
        "oracle": "lvlmva.plugins.critics.oracle:OracleCritic",
        "openai": "lvlmva.plugins.lvlm.openai_backend:OpenAICritic",
        "transformers": "lvlmva.plugins.lvlm.transformers_backend:TransformersCritic",
        # simulated mistakes on the true verdicts, for offline runs of sampling and review: not an LVLM
        "scripted": "lvlmva.plugins.critics.scripted:ScriptedCritic",
    },
    "judge": {
        "rules": "lvlmva.plugins.judges.rules:RulesJudge",
        "openai": "lvlmva.plugins.lvlm.openai_backend:OpenAIJudge",
        "transformers": "lvlmva.plugins.lvlm.transformers_backend:TransformersJudge",
    },
    "aligner": {
        "rrr": "lvlmva.plugins.aligners.rrr:RrrAligner",
        "rbr": "lvlmva.plugins.aligners.rbr:RbrAligner",
        "rrr-gradcam": "lvlmva.plugins.aligners.rrr_gradcam:RrrGradCamAligner",
        "hint": "lvlmva.plugins.aligners.hint:HintAligner",
        "cdep": "lvlmva.plugins.aligners.cdep:CdepAligner",
        "ce": "lvlmva.plugins.aligners.ce:CeAligner",
    },
    "mitigator": {
        "erm": "lvlmva.plugins.mitigators.erm:ErmMitigator",
        "dfr": "lvlmva.plugins.mitigators.dfr:DfrMitigator",
        "jtt": "lvlmva.plugins.mitigators.jtt:JttMitigator",
        "subg": "lvlmva.plugins.mitigators.subg:SubgMitigator",
        "suby": "lvlmva.plugins.mitigators.suby:SubyMitigator",
        "rwy": "lvlmva.plugins.mitigators.reweighting:RwyMitigator",
        "rwg": "lvlmva.plugins.mitigators.reweighting:RwgMitigator",
        "groupdro": "lvlmva.plugins.mitigators.groupdro:GroupDroMitigator",
        "lff": "lvlmva.plugins.mitigators.lff:LffMitigator",
        "afr": "lvlmva.plugins.mitigators.afr:AfrMitigator",
    },
    "evaluator": {
        "standard": "lvlmva.plugins.evaluators.standard:StandardEvaluator",
        "medmnist-c": "lvlmva.plugins.evaluators.medmnist_c:MedmnistCEvaluator",
    },
    "tracker": {
        "mlflow": "lvlmva.plugins.trackers.mlflow_tracker:MlflowTracker",
        "tensorboard": "lvlmva.plugins.trackers.tensorboard_tracker:TensorboardTracker",
        "wandb": "lvlmva.plugins.trackers.wandb_tracker:WandbTracker",
    },
}


@hookimpl
def lvlmva_register(registry):
    for role, plugins in BUILTINS.items():
        for name, factory in plugins.items():
            registry.add(role, name, factory)
