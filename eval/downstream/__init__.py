"""Downstream evaluation of generated anomalies on MVTec AD: localization (DRAEM's discriminative U-Net)
and anomaly-type classification (ResNet-34). See ``docs/anomaly_downstream.md``."""
